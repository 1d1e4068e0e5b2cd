"""Embedders: the bundled MiniLM's window is counted, can be widened as far as its positions go, and
the device and remote-code options reach sentence-transformers."""

from __future__ import annotations

import json

import pytest

from synth.cli import main
from synth.embed import EmbeddingConfig, load_embedder
from synth.errors import SynthError

LONG = " ".join(f"word{i} and then some" for i in range(120))  # ~600 word pieces
SHORT = "a short chunk about rivers"


def test_chunks_over_the_window_are_counted_and_the_window_can_be_widened():
    default = load_embedder("minilm")
    assert default.window == 256
    assert default.over_window([LONG, SHORT, LONG]) == 2
    wide = load_embedder("minilm", EmbeddingConfig(max_tokens=512))
    assert wide.window == 512 and wide.over_window([LONG[:1500], SHORT]) == 0
    assert wide.fingerprint != default.fingerprint  # other vectors, another cache
    a, b = default.embed([LONG]), wide.embed([LONG])
    assert a.shape == b.shape and float(a[0] @ b[0]) < 0.9999  # the wider window reads more text
    with pytest.raises(SynthError, match="--embed-max-tokens 1000: .* has positions for 512 tokens at most"):
        load_embedder("minilm", EmbeddingConfig(max_tokens=1000))


def test_device_reaches_the_model_and_a_bad_one_is_one_line():
    assert str(load_embedder("minilm", EmbeddingConfig(device="cpu")).model.device) == "cpu"
    with pytest.raises(SynthError, match="cannot load sentence-transformers model from .* on nodevice"):
        load_embedder("minilm", EmbeddingConfig(device="nodevice"))


def test_the_summary_warns_about_chunks_the_encoder_cannot_read_whole(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": f"d{i}", "text": LONG + f" doc {i}"}) for i in range(3)) + "\n")
    args = ["--meta", str(docs), "--out", str(tmp_path / "out"), "--embedder", "minilm", "--chunk-tokens", "400",
            "--seq-len", "2048", "--num-shards", "1"]
    assert main(args) == 0
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert 0 < counts["documents"]["meta"]["chunks_over_embedder_window"] <= counts["documents"]["meta"]["chunks"]
    assert counts["embedder"]["window"] == 256
    assert "chunks are longer than the embedder's window (256 tokens)" in capsys.readouterr().out
    assert main([*args[:3], str(tmp_path / "wide"), *args[4:], "--embed-max-tokens", "512"]) == 0
    wide = json.loads((tmp_path / "wide" / "manifest.json").read_text())["counts"]
    assert wide["documents"]["meta"]["chunks_over_embedder_window"] == 0


def test_a_run_without_an_embedder_keeps_the_cached_vectors_of_one_with(tmp_path):
    """plain-concat (no embedder) between two nextlong runs sharing a cache: the blocks keep both
    embedders' files, and the second nextlong run reuses its vectors instead of embedding again."""
    common = ["--meta", "sample:pydocs", "--max-meta-docs", "12", "--embedder", "hashing", "--index", "faiss-flat",
              "--seq-len", "1024", "--chunk-tokens", "64", "--num-shards", "1", "--docs-per-block", "4",
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    vectors = sorted((tmp_path / "cache").glob("chunks-*/block-*/emb-hashing*.npy"))
    written = {p: p.stat().st_mtime_ns for p in vectors}
    assert len(vectors) == 3
    assert main([*common, "--out", str(tmp_path / "b"), "--strategy", "plain-concat"]) == 0
    assert all(len(list(p.parent.glob("emb-*.npy"))) == 2 for p in vectors)  # hashing's and none's
    assert main([*common, "--out", str(tmp_path / "c")]) == 0
    assert {p: p.stat().st_mtime_ns for p in vectors} == written
