"""The Beam runner (DirectRunner, two worker processes) against the local runner."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import apache_beam  # noqa: F401 - the dev extra installs it: a broken install fails here rather than skipping
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from helpers import synth_args, write_corpus
from mirror_filesystem import MirrorFileSystem
from nextlong_jax.data import find_shards
from synth.cli import main
from synth.corpus import CorpusSpec, ReadStats, read_documents, resolve_sources
from synth.config import build_config
from synth.errors import SynthError
from synth.shards import OpenInputs, ShardInputs, make_shard
from synth.staging import Mirror, staging_dir
from synth.store import StoreRef

pytestmark = pytest.mark.slow



def _beam(mode: str, workers: int) -> list[str]:
    """nextlong-synth's options for Beam's direct runner."""
    return ["--runner", "beam", "--beam-options", f"--direct_num_workers={workers} --direct_running_mode={mode}"]


BEAM = _beam("multi_processing", 2)
# One worker process: what crosses from a worker to the user needs only one (each is a fresh interpreter).
ONE_WORKER = _beam("multi_processing", 1)
# Beam in this process: for what the workers' processes do not change (a rerun finding its work done, an
# error the driver raises, the mirror filesystem this process registers); 8 s less a run than BEAM.
IN_PROCESS = _beam("in_memory", 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Meta-documents over three files, with a malformed line, an empty text and an id that a later file
    repeats (so reading order decides which record is kept); a separate retrieval corpus."""
    root = tmp_path_factory.mktemp("beam")
    meta = root / "meta"
    meta.mkdir()
    for part, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_corpus(meta / f"{part}.jsonl", 14, seed=seed)
    with open(meta / "b.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "empty", "text": "  "}) + "\n")
    # b.jsonl and c.jsonl reuse a.jsonl's ids doc0..doc13: only a.jsonl's records are kept.
    with open(meta / "c.jsonl", "a") as f:
        f.write(json.dumps({"id": "only-in-c", "text": "glacier ice snow.\nriver boat current."}) + "\n")
    corpus = write_corpus(root / "corpus.jsonl", 40, seed=9)
    return meta, corpus


def _examples(out: Path) -> set[bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    files = [str(out / shard["file"]) for shard in manifest["shards"]]
    return {record.numpy() for record in tf.data.TFRecordDataset(files)}


def test_beam_runner_writes_the_local_runners_examples(inputs, tmp_path):
    """Two worker processes, each embedding its own blocks on its own devices (the JAX encoder): the
    vectors, examples and counts equal one process's; a rerun finds everything done."""
    meta, corpus = inputs
    args = ["--corpus", str(corpus), "--num-shards", "3", "--corpus-dedup", "0.8", "--embedder", "minilm",
            "--embed-backend", "jax", "--docs-per-block", "4"]
    local, beam = tmp_path / "local", tmp_path / "beam"
    assert main(synth_args(meta, local, *args)) == 0
    assert main(synth_args(meta, beam, *args, *BEAM)) == 0

    blocks = sorted(p.relative_to(local) for p in local.glob(".cache/chunks-*/block-*/emb-*.npy"))
    assert len(blocks) == 4 + 10  # 15 meta documents and 40 corpus documents, 4 to a block
    assert sorted(p.relative_to(beam) for p in beam.glob(".cache/chunks-*/block-*/emb-*.npy")) == blocks
    for block in blocks:
        np.testing.assert_allclose(np.load(beam / block), np.load(local / block), atol=1e-6)
    examples = _examples(local)
    assert len(examples) > 10
    assert _examples(beam) == examples
    local_summary, beam_summary = (json.loads((o / "manifest.json").read_text())["counts"] for o in (local, beam))
    # Counts come from Beam metrics: reads, skips by reason, chunks, sequences, tokens by role.
    assert beam_summary == local_summary
    assert local_summary["documents"]["meta"]["accepted"] == 15
    assert local_summary["documents"]["meta"]["skipped"] == {"duplicate_id": 28, "empty_text": 1, "malformed_json": 1}

    # A second run finds every block, the index and every shard done, and changes nothing.
    shards = {p: p.stat().st_mtime_ns for p in beam.glob("*.tfrecord*")}
    assert main(synth_args(meta, beam, *args, *IN_PROCESS)) == 0
    assert {p: p.stat().st_mtime_ns for p in beam.glob("*.tfrecord*")} == shards


def test_inputs_named_by_url_are_read_through_beam_filesystems(inputs, tmp_path):
    """A folder URL, a glob URL and a Parquet file URL read as their local paths do; the Beam runner
    (in this process, where the test filesystem is registered) reads the URL too."""
    meta, corpus = inputs
    url = MirrorFileSystem.PREFIX + str(meta)
    for local, remote in ((meta, url), (meta / "[ab].jsonl", f"{url}/[ab].jsonl")):
        stats_local, stats_remote = ReadStats(), ReadStats()
        expected = list(read_documents(CorpusSpec(str(local)), stats_local))
        assert list(read_documents(CorpusSpec(remote), stats_remote)) == expected
        assert stats_remote == stats_local and stats_local.accepted > 0
    table = pa.table({"id": ["x", "y"], "text": ["one.\ntwo.", "three."]})
    pq.write_table(table, tmp_path / "t.parquet")
    documents = read_documents(CorpusSpec(MirrorFileSystem.PREFIX + str(tmp_path / "t.parquet")), ReadStats())
    assert [(d.id, d.text) for d in documents] == [("x", "one.\ntwo."), ("y", "three.")]
    with pytest.raises(SynthError, match="no such file or folder"):
        resolve_sources(CorpusSpec(url + "/missing.jsonl"))

    args = ["--corpus", str(corpus), "--num-shards", "2"]
    assert main(synth_args(meta, tmp_path / "local", *args)) == 0
    assert main(synth_args(url, tmp_path / "beam", *args, *IN_PROCESS)) == 0
    assert _examples(tmp_path / "beam") == _examples(tmp_path / "local")


def test_output_and_cache_at_a_url(inputs, tmp_path, capsys):
    """--out as a URL: every stage works in local staging, pulls what it reads and pushes what it finishes.
    The URL alone holds the run: with the local staging gone, a rerun pulls what it needs and redoes nothing."""
    meta, corpus = inputs
    args = ["--corpus", str(corpus), "--num-shards", "3", "--corpus-dedup", "0.8", "--index", "faiss-hnsw"]
    assert main(synth_args(meta, tmp_path / "local", *args)) == 0
    remote = tmp_path / "bucket" / "run"
    url = MirrorFileSystem.PREFIX + str(remote)
    assert main(synth_args(meta, url, *args, *IN_PROCESS)) == 0
    assert f"output: {url}/manifest.json" in capsys.readouterr().out

    assert _examples(remote) == _examples(tmp_path / "local")
    # Training on the output at its URL finds the shards there and checks them against the manifest.
    shards = find_shards(url, 1024, verify_sha256=True).files
    assert shards == tuple(f"{url}/{p.name}" for p in sorted(remote.glob("*.tfrecord")))
    counts = json.loads((remote / "manifest.json").read_text())["counts"]
    assert counts == json.loads((tmp_path / "local" / "manifest.json").read_text())["counts"]
    assert counts["index"]["recall_at_10"] > 0.5 and counts["corpus_near_duplicate_documents"] is not None
    cache = remote / ".cache"
    assert len(list(cache.glob("chunks-*/block-*/emb-*.npy"))) == 2 + 5  # 15 and 40 documents, 8 to a block
    assert len(list(cache.glob("index-*/meta.json"))) == 1 and list(cache.glob("chunks-*/near-duplicates-*.npy"))
    assert not [p for p in remote.rglob(".*.tmp")], "a partial upload was left behind"

    # A fresh machine (no staging) and one shard lost at the URL: the worker that remakes it pulls both
    # stores, the index and the near-duplicate marks; nothing else is redone.
    lost = sorted(remote.glob("*.tfrecord"))[1]
    lost_bytes = lost.read_bytes()
    lost.unlink()
    finished = {p: p.stat().st_mtime_ns for p in remote.rglob("*")
                if p.is_file() and p.name not in ("manifest.json", "summary.md") and lost.name not in p.name}
    shutil.rmtree(staging_dir(url))
    assert main(synth_args(meta, url, *args, *IN_PROCESS)) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "finished work was redone"
    assert lost.read_bytes() == lost_bytes
    assert json.loads((remote / "manifest.json").read_text())["counts"] == counts

    # A worker on a machine of its own, with nothing staged, pulls what a shard is made from.
    config = build_config({"meta": str(meta), "corpus": str(corpus), "out": url, "tokenizer": "llama3",
                           "embedder": "hashing", "index": "faiss-hnsw", "seq-len": 1024, "chunk-tokens": 64,
                           "num-shards": 3, "docs-per-block": 8, "corpus-dedup": 0.8})
    staged = staging_dir(url) / ".cache"
    shutil.rmtree(staging_dir(url))

    def store(chunks: Path) -> StoreRef:
        blocks = sorted(chunks.glob("block-*"))
        embeddings = next(blocks[0].glob("emb-*.npy"))
        return StoreRef(tuple(staged / b.relative_to(cache) for b in blocks), embeddings.name,
                        np.load(embeddings).shape[1])

    corpus_chunks = next(cache.glob("chunks-*/near-duplicates-*.npy"))
    meta_chunks = next(c for c in cache.glob("chunks-*") if c != corpus_chunks.parent)
    inputs = ShardInputs(config, store(meta_chunks), store(corpus_chunks.parent),
                         staged / next(cache.glob("index-*")).name, staged / corpus_chunks.relative_to(cache))
    inputs.pull(Mirror.of(config.output))
    opened = OpenInputs.open(inputs)
    make_shard(opened, 1, progress=False)
    assert (staging_dir(url) / lost.name).read_bytes() == lost_bytes
    # Mining searches the index with the meta-chunks' vectors: the corpus's were never read into memory.
    assert "embeddings" in vars(opened.extension.meta) and "embeddings" not in vars(opened.extension.corpus)

    assert main(synth_args(meta, url, *args)) == 2  # the local runner writes local paths only
    assert "--runner beam" in capsys.readouterr().err
    shutil.rmtree(staging_dir(url))


def test_a_directory_is_done_only_when_its_marker_is_at_the_url(tmp_path):
    remote = tmp_path / "remote"
    url = MirrorFileSystem.PREFIX + str(remote)
    mirror = Mirror(((tmp_path / "staging", url),))
    block = tmp_path / "staging" / "block-00000"
    block.mkdir(parents=True)
    (block / "tokens.npy").write_bytes(b"tokens")
    with pytest.raises(SynthError, match="not complete"):
        mirror.push_dir(block, "emb.npy")
    mirror.push(block / "tokens.npy")  # as a push killed before its marker leaves it
    assert (remote / "block-00000" / "tokens.npy").read_bytes() == b"tokens"
    assert not mirror.pull_dir(block, "emb.npy")

    (block / "emb.npy").write_bytes(b"vectors")
    mirror.push_dir(block, "emb.npy")
    shutil.rmtree(tmp_path / "staging")
    assert mirror.pull_dir(block, "emb.npy") and (block / "emb.npy").read_bytes() == b"vectors"
    leftover = tmp_path / "staging" / "report.json"
    leftover.write_text("{}")
    assert not mirror.pull(leftover), "a local file the URL lacks was taken for done"
    assert Mirror().pull(leftover) and Mirror().url(leftover) is None  # unstaged: the local file is the file


def test_worker_errors_reach_the_user_as_one_line(inputs, tmp_path, capsys):
    meta, corpus = inputs
    assert main(synth_args(meta, tmp_path / "strict", "--corpus", str(corpus), "--strict", *ONE_WORKER)) == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error and len(error.splitlines()) == 1
    assert "duplicate_id" in error or "malformed_json" in error

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n" + json.dumps({"id": "e", "text": ""}) + "\n")
    assert main(synth_args(bad, tmp_path / "empty", "--corpus", str(corpus), *IN_PROCESS)) == 2  # the driver's check
    assert "no usable documents" in capsys.readouterr().err


def test_killed_pipeline_resumes_to_the_same_examples(inputs, tmp_path):
    """A Beam run killed (SIGKILL) right after its third block; the same command again reuses the
    finished blocks and writes what an uninterrupted run writes."""
    meta, corpus = inputs
    args = ["--corpus", str(corpus), "--num-shards", "6", "--docs-per-block", "2"]
    assert main(synth_args(meta, tmp_path / "reference", *args)) == 0
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_at.py"), "synth.store:_write_block", "3",
                             "-m", "synth.cli", *synth_args(meta, out, *args, *IN_PROCESS)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill point:\n{killed.stderr[-3000:]}"
    assert not (out / "manifest.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in (out / ".cache").glob("chunks-*/block-*/emb-*.npy")}
    assert len(kept) == 3

    assert main(synth_args(meta, out, *args, *IN_PROCESS)) == 0  # the same work, in this process
    assert _examples(out) == _examples(tmp_path / "reference")
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished blocks were rebuilt"


def test_bad_beam_options_are_one_line_errors(inputs, tmp_path, capsys):
    meta, _ = inputs
    assert main(synth_args(meta, tmp_path / "out", "--runner", "beam", "--beam-options=--direct_num_workers=two")) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [error] and "--beam-options" in error and "'two'" in error
    assert not (tmp_path / "out").exists()  # refused before anything was written
