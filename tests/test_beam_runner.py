"""The Beam runner (DirectRunner, two worker processes) against the local runner."""

import json
from pathlib import Path

import pytest

pytest.importorskip("apache_beam")

import tensorflow as tf  # noqa: E402
from synth.cli import main  # noqa: E402
from test_pipeline import synth_args, write_corpus  # noqa: E402

BEAM = ["--runner", "beam", "--beam-options", "--direct_num_workers=2 --direct_running_mode=multi_processing"]


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
    meta, corpus = inputs
    args = ["--corpus", str(corpus), "--num-shards", "3"]
    local, beam = tmp_path / "local", tmp_path / "beam"
    assert main(synth_args(meta, local, *args)) == 0
    assert main(synth_args(meta, beam, *args, *BEAM)) == 0

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
    assert main(synth_args(meta, beam, *args, *BEAM)) == 0
    assert {p: p.stat().st_mtime_ns for p in beam.glob("*.tfrecord*")} == shards
