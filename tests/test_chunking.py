import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synth.chunking import MIN_CHAR_LIMIT, chunk_document, chunk_documents

WORDS = st.sampled_from(["the", "index", "Python", "naïve", "日本語", "🤗", "x" * 40, "3.14", "",
                         "end.", "Why?", "wow!", "(a)", "\t", "  "])
LINES = st.lists(WORDS, max_size=60).map(" ".join)
TEXTS = st.lists(LINES, max_size=25).map("\n".join) | st.text(max_size=800)


def _cuts(chunks):
    positions, at = [], 0
    for chunk in chunks[:-1]:
        at += len(chunk.text)
        positions.append(at)
    return positions


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, limit=st.integers(4, 200))
def test_token_chunks_are_lossless_bounded_and_decode(tokenizer, text, limit):
    chunks = chunk_document(text, limit, "tokens", tokenizer)
    assert "".join(c.text for c in chunks) == text
    assert all(0 < len(c.ids) <= limit for c in chunks)
    assert all(tokenizer.decode(c.ids.tolist()) == c.text for c in chunks)
    assert sum(len(c.ids) for c in chunks) == len(tokenizer.encode(text))


@settings(max_examples=100, deadline=None)
@given(text=TEXTS, limit=st.integers(MIN_CHAR_LIMIT, 600))
def test_char_chunks_are_lossless_and_bounded(tokenizer, text, limit):
    chunks = chunk_document(text, limit, "chars", tokenizer)
    assert "".join(c.text for c in chunks) == text
    assert all(0 < len(c.text) <= limit for c in chunks)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(LINES, min_size=1, max_size=25), limit=st.integers(8, 120))
def test_lines_that_fit_are_never_cut(tokenizer, lines, limit):
    text = "\n".join(lines)
    cuts = _cuts(chunk_document(text, limit, "tokens", tokenizer))
    start = 0
    for line in lines:
        content_end = start + len(line.rstrip())
        if len(tokenizer.encode(line)) < limit:
            assert not [c for c in cuts if start < c < content_end], (line, cuts)
        start += len(line) + 1


def test_greedy_grouping_packs_paragraphs(tokenizer):
    paragraphs = [f"Paragraph {i} talks about topic {i} at some length." for i in range(40)]
    text = "\n".join(paragraphs)
    chunks = chunk_document(text, 64, "tokens", tokenizer)
    # Each chunk holds whole lines, and adding the next line would have broken the limit.
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.text.endswith("\n")
        next_line = following.text.split("\n")[0] + "\n"
        assert len(chunk.ids) + len(tokenizer.encode(next_line)) > 64


def test_long_line_splits_at_sentence_ends_then_tokens(tokenizer):
    sentences = [f"Sentence number {i} is here." for i in range(30)]
    text = " ".join(sentences) + " " + "unbroken " * 300
    chunks = chunk_document(text, 50, "tokens", tokenizer)
    assert "".join(c.text for c in chunks) == text
    sentence_chunks = [c.text for c in chunks if "Sentence" in c.text]
    assert all(t.rstrip().endswith(".") for t in sentence_chunks[:-1])
    assert max(len(c.ids) for c in chunks) == 50  # the run-on tail fills chunks exactly


def test_multi_megabyte_single_line(tokenizer):
    text = "x" * 3_000_000
    chunks = chunk_document(text, 512, "tokens", tokenizer)
    assert "".join(c.text for c in chunks) == text
    assert max(len(c.ids) for c in chunks) <= 512


def test_batch_matches_single(tokenizer):
    texts = ["a b c\nd e f. g h i! j", "", "one\n\ntwo\n"]
    batch = chunk_documents(texts, 4, "tokens", tokenizer)
    single = [chunk_document(t, 4, "tokens", tokenizer) for t in texts]
    assert [[c.text for c in cs] for cs in batch] == [[c.text for c in cs] for cs in single]
    assert batch[1] == []


@pytest.mark.parametrize("limit,unit", [(0, "tokens"), (100, "chars"), (10, "words")])
def test_bad_limits_are_rejected(tokenizer, limit, unit):
    with pytest.raises(ValueError):
        chunk_document("text", limit, unit, tokenizer)
