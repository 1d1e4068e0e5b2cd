"""`nextlong-synth inspect` on a real (small) synthesis output: the pieces rebuild each sequence and
carry its provenance, the page renders in headless Chromium, and the command line's errors."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import helpers
from nextlong_contract.reader import parser
from nextlong_contract.schema import ROLE_META, ROLE_NAMES, ROLE_NEGATIVE
from synth.assemble import Joiner, Packer, Piece
from synth.chunking import chunk_document
from synth.cli import main
from synth.embed import HashingEmbedder
from synth.errors import SynthError
from synth.inspect import Inspected, inspect, render_html, spans
from synth.tfrecord import read_dataset, to_example
from nextlong_contract.tokenizer import load_tokenizer

ROLE_IDS = {name: role for role, name in ROLE_NAMES.items()}
META_RGB, NEGATIVE_RGB = (0xCD, 0xE3, 0xFF), (0xFF, 0xD8, 0xB0)  # synth.inspect's role backgrounds


def write_corpus(path: Path, docs: int) -> Path:
    """Multi-paragraph documents; '<i>' and '&amp;' in the text must reach the page escaped."""
    return helpers.write_corpus(path, docs, topics=helpers.TOPICS[:4], filler=("the", "of", "<i>", "&amp;"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = write_corpus(root / "docs.jsonl", 32)
    out = root / "out"
    # Two segments per sequence, negatives at weight 0.3, two shards for --index to count across.
    assert main(["--meta", str(corpus), "--out", str(out), "--tokenizer", "llama3", "--embedder", "hashing",
                 "--index", "faiss-flat", "--seq-len", "1024", "--doc-len", "512", "--chunk-tokens", "64",
                 "--num-shards", "2", "--docs-per-block", "8", "--negative-weight", "0.3"]) == 0
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus)}
    return out, docs


def test_pieces_rebuild_every_sequence_and_carry_its_negatives(run):
    out, docs = run
    tok, embedder = load_tokenizer("llama3"), HashingEmbedder()
    negatives_seen = 0
    for example in read_dataset(out, with_provenance=True).as_numpy_iterator():
        pieces = spans(example, tok)
        np.testing.assert_array_equal(np.concatenate([p.ids for p in pieces]), example["input_ids"])
        for p in pieces:
            where = slice(p.start, p.start + len(p.ids))
            assert (example["token_roles"][where] == ROLE_IDS[p.role]).all()
            assert (example["segment_ids"][where] == p.segment).all()
            np.testing.assert_array_equal(p.weights, example["loss_weights"][where])
        assert [p.start for p in pieces if p.kind in ("meta-chunk", "negative")] == example["piece_starts"].tolist()
        negatives = [p for p in pieces if p.kind == "negative"]
        assert [p.source for p in negatives] == [v.decode() for v in example["negative_chunk_ids"]]
        assert [p.score for p in negatives] == example["negative_scores"].tolist()
        assert {float(w) for p in negatives for w in p.weights} == {np.float32(0.3)}
        assert all(p.weights.tolist() == [0.0] and p.text == "<|begin_of_text|>" for p in pieces if p.kind == "BOS")
        # Each negative follows the meta-chunk it was mined for (--meta-position head); its score is
        # the cosine of their embeddings, recomputed from the texts (the whole chunk: a negative may be cut).
        meta = None
        for p in pieces:
            if p.kind in ("BOS", "padding"):
                meta = None
            elif p.kind == "meta-chunk":
                meta = p
            elif p.kind == "negative":
                doc, chunk = p.source.rsplit("#", 1)
                negative_text = chunk_document(docs[doc], 64, "tokens", tok)[int(chunk)].text
                assert negative_text.startswith(p.text.lstrip("\n")[:20])
                vectors = embedder.embed([meta.text, negative_text])
                assert abs(float(vectors[0] @ vectors[1]) - p.score) < 1e-5
                negatives_seen += 1
    assert negatives_seen > 50


def test_index_counts_over_the_shards_in_manifest_order(run):
    out, _ = run
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["shards"][0]["sequences"]
    view = inspect(out, first + 1)
    assert (view.shard, view.record, view.total) == (manifest["shards"][1]["file"], 1, manifest["counts"]["sequences"])
    want = list(read_dataset(out).as_numpy_iterator())[first + 1]["input_ids"]
    np.testing.assert_array_equal(np.concatenate([s.ids for s in view.spans]), want)
    assert (view.strategy, view.seq_len, view.tokenizer) == ("nextlong", 1024, "llama3")


def test_a_joiner_cut_off_from_its_chunk_and_padding_are_pieces_of_their_own():
    """A segment with room for a negative's joiner alone, after a meta-chunk: the negative is not placed,
    so its joiner is neither a piece start nor a negative, and the negative ids stay with their pieces."""
    tok = load_tokenizer("llama3")
    packer = Packer(seq_len=16, negative_weight=0.3, bos_id=tok.bos_id, pad_id=tok.pad_id, doc_len=5,
                    joiner=Joiner.build("auto", tok))
    packer.begin_segment(("a",))
    packer.add(np.asarray(tok.encode("one two three")), ROLE_META, Piece("meta", 0, 0))
    packer.add(np.asarray(tok.encode("five six")), ROLE_NEGATIVE, Piece("corpus", 6, 10), ("c#0", 0.5))
    packer.begin_segment(("d",))
    packer.add(np.asarray(tok.encode("seven")), ROLE_META, Piece("meta", 1, 1))
    packer.add(np.asarray(tok.encode("four")), ROLE_NEGATIVE, Piece("corpus", 5, 9), ("b#0", 0.25))
    sequence = packer.take()
    example = {k: v.numpy() for k, v in parser(16, with_provenance=True)(to_example(sequence)).items()}
    pieces = spans(example, tok)
    assert [p.kind for p in pieces] == ["BOS", "meta-chunk", "joiner", "BOS", "meta-chunk", "negative", "padding"]
    assert [(p.source, p.score, p.text) for p in pieces if p.kind == "negative"] == [("b#0", 0.25, "\nfour")]
    assert pieces[2].text == "\n" and pieces[2].role == "negative" and pieces[-1].text == ""
    np.testing.assert_array_equal(np.concatenate([p.ids for p in pieces]), sequence.input_ids)
    example["piece_starts"] = example["piece_starts"][:0]  # as written before piece_starts existed
    with pytest.raises(SynthError, match="re-synthesize"):
        spans(example, tok)


def _chromium(page: Path, profile: Path, *how: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1200,1600", *how, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=60, check=True)


def test_the_page_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    assert shutil.which("chromium"), "needs Debian's chromium: `make test` installs it (apt-get install -y chromium)"
    out, _ = run
    view = inspect(out, 3)
    page = tmp_path / "page.html"
    page.write_text(render_html(view), encoding="utf-8")
    shot = tmp_path / "shot.png"
    _chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(shot)
    assert image.size == (1200, 1600)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    for rgb in (META_RGB, NEGATIVE_RGB):
        assert (np.abs(pixels - rgb).max(axis=1) <= 2).sum() > 10_000, f"role colour {rgb} not seen"

    dom = _chromium(page, tmp_path / "profile", "--dump-dom").stdout
    negative = next(s for s in view.spans if s.kind == "negative")
    meta = [s for s in view.spans if s.kind == "meta-chunk"][-1]
    assert negative.source in dom and f"cos {negative.score:.3f}" in dom and "weight 0.3" in dom
    assert f"meta-chunk @{meta.start} " in dom and f"segment {meta.segment}" in dom
    assert "&lt;i&gt;" in dom and "&amp;amp;" in dom and "<i>" not in dom  # text escaped, not markup
    assert not {"<script", "src=", "href="} & {tag for tag in ("<script", "src=", "href=") if tag in dom}


def test_the_page_is_proportional_to_the_text():
    """128K tokens of padding add one line; the markup per piece is a constant."""
    view = Inspected(Path("o"), 0, 1, "s", 0, "nextlong", 1 << 17, "llama3", ("d",), ())
    empty = len(render_html(view))
    tok = load_tokenizer("llama3")
    example = {"input_ids": np.full(1 << 17, tok.pad_id), "token_roles": np.zeros(1 << 17, np.int64),
               "segment_ids": np.zeros(1 << 17, np.int64), "loss_weights": np.zeros(1 << 17, np.float32),
               "piece_starts": np.zeros(0, np.int64), "negative_chunk_ids": np.zeros(0, object),
               "negative_scores": np.zeros(0, np.float32)}
    padded = Inspected(Path("o"), 0, 1, "s", 0, "nextlong", 1 << 17, "llama3", ("d",), tuple(spans(example, tok)))
    assert len(render_html(padded)) - empty < 500


def test_command_line_text_view_page_and_errors(run, tmp_path, capsys):
    out, _ = run
    total = json.loads((out / "manifest.json").read_text())["counts"]["sequences"]
    assert main(["inspect", str(out), "--index", "0"]) == 0
    text = capsys.readouterr().out
    example = next(read_dataset(out, with_provenance=True).as_numpy_iterator())
    assert f"sequence 0 of {total}" in text and example["negative_chunk_ids"][0].decode() in text
    assert main(["inspect", str(out), "--index", "2", "--html", str(tmp_path / "p.html")]) == 0
    assert (tmp_path / "p.html").read_text().startswith("<!doctype html>")

    capsys.readouterr()
    assert main(["inspect", str(out), "--index", str(total)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nextlong-synth: error: ") and f"holds {total} sequences" in err and err.count("\n") == 1
    assert main(["inspect", str(tmp_path), "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nextlong-synth: error: ") and "manifest.json not found" in err and err.count("\n") == 1
