import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synth.corpus import (CorpusSpec, Document, ReadStats, content_id, corpus_fingerprint, read_documents,
                          resolve_sample)
from synth.errors import SynthError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(path, **options) -> tuple[list[Document], ReadStats]:
    stats = ReadStats()
    docs = list(read_documents(CorpusSpec(str(path), **options), stats))
    return docs, stats


def pairs(docs: list[Document]) -> list[tuple[str, str]]:
    return [(d.id, d.text) for d in docs]


RECORDS = [{"id": "b", "text": "bravo"}, {"id": "a", "text": "alpha"}, {"id": 3, "text": "three"}]
EXPECTED = [("b", "bravo"), ("a", "alpha"), ("3", "three")]


def test_jsonl_keeps_file_order_and_converts_int_ids(tmp_path):
    docs, stats = read(write_jsonl(tmp_path / "docs.jsonl", RECORDS))
    assert pairs(docs) == EXPECTED
    assert stats.accepted == 3 and not stats.skipped


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in RECORDS)
    assert pairs(read(path)[0]) == EXPECTED


def test_parquet_across_batches_with_binary_text(tmp_path):
    ids = list(range(600))
    texts = [f"row {i}".encode() for i in ids]
    texts[5] = b"caf\xe9"  # a binary column can carry bytes that are not UTF-8
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.binary())})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=250)
    docs, stats = read(tmp_path / "docs.parquet")
    assert [d.id for d in docs] == [str(i) for i in ids if i != 5]
    assert docs[-1].text == "row 599"
    assert stats.skipped == Counter(non_utf8=1)


def test_records_without_an_id_are_kept_under_a_content_id(tmp_path):
    """Cosmopedia-style data has no id column: kept, named by a hash of the text (the same in every
    run and order), and an exact repeat of the text is then a counted duplicate."""
    lines = [{"text": "first"}, {"id": "", "text": "second"}, {"id": "x", "text": "third"}, {"text": "first"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    docs, stats = read(tmp_path / "a.jsonl")
    assert [d.text for d in docs] == ["first", "second", "third"]
    assert docs[0].id == content_id("first") != content_id("second") == docs[1].id and docs[2].id == "x"
    assert stats.skipped == Counter(duplicate_id=1)
    pq.write_table(pa.table({"text": ["second", "first"]}), tmp_path / "b.parquet")
    docs, stats = read(tmp_path / "b.parquet")
    assert [d.id for d in docs] == [content_id("second"), content_id("first")] and not stats.skipped


def test_parquet_without_the_text_column_counts_every_row(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), tmp_path / "docs.parquet")
    docs, stats = read(tmp_path / "docs.parquet")
    assert docs == [] and stats.skipped == Counter(missing_field=2)
    docs, _ = read(tmp_path / "docs.parquet", text_field="body")
    assert pairs(docs) == [("a", "x"), ("b", "y")]


def test_text_directory(tmp_path):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "sub" / "a.md").write_text("# a\nmarkdown")
    (root / "a.rst").write_text("rest")
    (root / "script.py").write_text("print()")
    (root / ".git" / "HEAD.txt").write_text("hidden")
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    (root / "blank.txt").write_text(" \n\n")
    docs, stats = read(root)
    assert pairs(docs) == [("a.rst", "rest"), ("b.txt", "bee"), ("sub/a.md", "# a\nmarkdown")]
    assert stats.skipped == Counter(non_utf8=1, empty_text=1)


def test_text_file_over_the_limit_is_too_long(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 500)
    (tmp_path / "huge.txt").write_text("x" * 5000)  # skipped from its size, unread
    docs, stats = read(tmp_path, max_doc_chars=100)
    assert docs == [] and stats.skipped == Counter(too_long=2)


def test_glob_matches_sorted_and_ids_relative_to_its_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "b.txt").write_text("second")
    (tmp_path / "x" / "a.txt").write_text("first")
    (tmp_path / "x" / "c.md").write_text("not matched")
    docs, _ = read(tmp_path / "x" / "*.txt")
    assert pairs(docs) == [("a.txt", "first"), ("b.txt", "second")]
    write_jsonl(tmp_path / "part-2.jsonl", [{"id": "p2", "text": "two"}])
    write_jsonl(tmp_path / "part-1.jsonl", [{"id": "p1", "text": "one"}])
    assert [d.id for d in read(tmp_path / "part-*.jsonl")[0]] == ["p1", "p2"]


def test_directory_of_data_files_ignores_readme(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "j", "text": "from jsonl"}])
    pq.write_table(pa.table({"id": ["p"], "text": ["from parquet"]}), tmp_path / "a.parquet")
    (tmp_path / "README.md").write_text("about this data")
    assert pairs(read(tmp_path)[0]) == [("p", "from parquet"), ("j", "from jsonl")]
    assert [d.id for d in read(tmp_path, format="jsonl")[0]] == ["j"]


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"url": "u1", "body": "text one", "id": "x"}])
    docs, _ = read(path, id_field="url", text_field="body")
    assert pairs(docs) == [("u1", "text one")]


BIG_TEXT_CHARS = 3_000_000


def mixed_file(tmp_path: Path) -> Path:
    lines = [
        b'{"id": "a", "text": "alpha"}',
        b"",  # blank lines are not records
        b'{"id": "b", "text": ',  # 3: cut off
        b"[1, 2]",  # 4: JSON, but not an object
        b'{"id": "c", "text": "caf\xe9"}',  # 5: Latin-1, not UTF-8
        b'{"id": "d", "text": " \\n\\t "}',
        b'{"id": "e"}',
        b'{"id": "f", "text": 5}',
        b'{"id": ["g"], "text": "list id"}',
        b'{"id": "a", "text": "again"}',
        b'{"id": "h", "text": "lone \\ud800 surrogate"}',
        json.dumps({"id": "big", "text": "y" * BIG_TEXT_CHARS}).encode(),
        b'{"id": "z", "text": "last"}',
        b"   ",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_each_bad_record_is_skipped_and_counted(tmp_path):
    path = mixed_file(tmp_path)
    bad = Counter(malformed_json=2, non_utf8=2, empty_text=1, missing_field=3, duplicate_id=1)
    docs, stats = read(path, max_doc_chars=4_000_000)
    assert [d.id for d in docs] == ["a", "big", "z"]
    assert docs[0].text == "alpha" and len(docs[1].text) == BIG_TEXT_CHARS
    assert stats.skipped == bad and stats.accepted == 3
    docs, stats = read(path, max_doc_chars=BIG_TEXT_CHARS - 1)
    assert [d.id for d in docs] == ["a", "z"]
    assert stats.skipped == bad + Counter(too_long=1)
    assert stats.to_dict()["skipped"]["too_long"] == 1


def test_strict_names_file_line_and_reason(tmp_path):
    path = mixed_file(tmp_path)
    with pytest.raises(SynthError) as error:
        list(read_documents(CorpusSpec(str(path)), ReadStats(), strict=True))
    message = str(error.value)
    assert f"{path} line 3: malformed_json" in message and "\n" not in message


def test_strict_reports_duplicates_and_limits(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(SynthError, match="line 2: duplicate_id"):
        list(read_documents(CorpusSpec(str(path)), ReadStats(), strict=True))
    with pytest.raises(SynthError, match="line 1: too_long"):
        list(read_documents(CorpusSpec(str(path), max_doc_chars=0), ReadStats(), strict=True))


@pytest.mark.parametrize("path", ["does/not/exist.jsonl", "nothing-*.jsonl"])
def test_missing_path(tmp_path, path):
    with pytest.raises(SynthError, match="no such file"):
        read_documents(CorpusSpec(str(tmp_path / path)), ReadStats())


def test_directory_without_usable_files(tmp_path):
    (tmp_path / "data.csv").write_text("id,text\n")
    with pytest.raises(SynthError, match="no .* files in this directory"):
        read_documents(CorpusSpec(str(tmp_path)), ReadStats())


@pytest.mark.parametrize("content", [
    b"\x1f\x8b\x08\x00garbage that is not deflate data at all" * 4,
    gzip.compress(b'{"id": "a", "text": "alpha"}\n' * 1000)[:-12],  # truncated
])
def test_corrupt_gzip(tmp_path, content):
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(SynthError, match=f"cannot read {path}") as error:
        list(read_documents(CorpusSpec(str(path)), ReadStats()))
    assert "\n" not in str(error.value)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(SynthError, match=f"cannot read {path}"):
        list(read_documents(CorpusSpec(str(path)), ReadStats()))


def test_unreadable_file(tmp_path):
    # Reading /proc/self/mem at offset 0 fails with EIO whoever runs the tests.
    with pytest.raises(SynthError, match="cannot read /proc/self/mem"):
        list(read_documents(CorpusSpec("/proc/self/mem", format="jsonl"), ReadStats()))
    if os.geteuid() != 0:  # root reads files whatever their mode
        path = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
        path.chmod(0)
        with pytest.raises(SynthError, match="permission denied"):
            list(read_documents(CorpusSpec(str(path)), ReadStats()))


def test_max_docs_counts_accepted_documents(tmp_path):
    records = [{"id": "a", "text": ""}] + [{"id": str(i), "text": f"t{i}"} for i in range(10)]
    docs, stats = read(write_jsonl(tmp_path / "docs.jsonl", records), max_docs=4)
    assert [d.id for d in docs] == ["0", "1", "2", "3"]
    assert stats.accepted == 4 and stats.skipped == Counter(empty_text=1)
    assert read(tmp_path / "docs.jsonl", max_docs=0)[0] == []


def test_order_is_deterministic_whatever_the_creation_order(tmp_path):
    names = ["m.txt", "a.txt", "z/b.txt", "c.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    first, second = read(tmp_path)[0], read(tmp_path)[0]
    assert first == second
    assert [d.id for d in first] == ["a.txt", "c.txt", "m.txt", "z/b.txt"]


def test_bundled_samples_load():
    docs, stats = read("sample:pydocs")
    assert stats.accepted == len(docs) > 1000 and not stats.skipped
    assert len({d.id for d in docs}) == len(docs)
    assert any(d.id.startswith("library/json#") for d in docs)
    jargon, stats = read("sample:jargon", max_docs=50)
    assert len(jargon) == 50 and all(d.id.startswith("jargon/") for d in jargon)
    assert resolve_sample("pydocs").is_file()
    with pytest.raises(SynthError, match="sample:jargon, sample:pydocs"):
        resolve_sample("sample:nope")


def test_fingerprint_follows_the_files_and_the_spec(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    spec = CorpusSpec(str(tmp_path))
    before = corpus_fingerprint(spec)
    assert corpus_fingerprint(spec) == before
    assert corpus_fingerprint(CorpusSpec(str(tmp_path), max_docs=1)) != before
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = corpus_fingerprint(spec)
    assert touched != before
    write_jsonl(path, RECORDS[:1])
    assert corpus_fingerprint(spec) not in (before, touched)
    write_jsonl(tmp_path / "more.jsonl", RECORDS)
    assert corpus_fingerprint(CorpusSpec(str(path))) != corpus_fingerprint(spec)


def test_tfds_dataset_on_disk(tmp_path):
    import tensorflow_datasets as tfds  # the dev extra installs it: a broken install fails, not skips
    features = tfds.features.FeaturesDict({"doc_id": tfds.features.Text(),
                                           "body": tfds.features.Text()})
    examples = [(i, {"doc_id": f"d{i}", "body": f"document {i}" if i != 2 else " "})
                for i in range(5)]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_docs", version="1.0.0", features=features, split_datasets={"train": examples},
        data_dir=tmp_path, disable_shuffling=True)
    dataset_dir = tmp_path / "tiny_docs" / "1.0.0"
    docs, stats = read(dataset_dir, id_field="doc_id", text_field="body")
    assert pairs(docs) == [(f"d{i}", f"document {i}") for i in (0, 1, 3, 4)]
    assert stats.skipped == Counter(empty_text=1)
    with pytest.raises(SynthError, match="Unknown split"):
        read(dataset_dir, id_field="doc_id", text_field="body", tfds_split="validation")
