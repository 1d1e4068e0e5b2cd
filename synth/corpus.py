"""Streaming document readers: JSON lines (optionally gzipped), Parquet, plain-text folders, TFDS.

Every reader streams (a record, a line or a batch at a time), visits files in sorted order so that
a corpus always yields the same documents in the same order, and never drops a bad record without
counting it: each is skipped under a reason in `ReadStats.skipped`, or, with `strict`, stops the
read with a `SynthError` naming the file and the line. Files that cannot be read at all (missing,
no permission, corrupt compression) raise `SynthError` as well.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import numbers
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from nextlong_contract.urls import is_url
from synth.errors import SynthError
from synth.files import Location, match_urls, open_binary, signature, size, url_files

FORMATS = ("auto", "jsonl", "parquet", "text", "tfds")
SAMPLE_PREFIX = "sample:"
SAMPLE_DIR = Path(__file__).parent / "sample_data"
_SAMPLE_SUFFIX = ".jsonl.gz"
_SUFFIXES = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json"),
    "parquet": (".parquet",),
    "text": (".txt", ".md", ".rst"),
}
# Part of every fingerprint: bump it when a change here makes the same files read differently,
# so that caches built from the old reading are not reused.
_READER_VERSION = 2  # 2: records without an id get a content id instead of being skipped
# Rows per Parquet batch: documents may be megabytes each, so batches stay small.
_PARQUET_BATCH_ROWS = 256
# UTF-8 needs at most four bytes per character, so a longer file is too long without reading it.
_MAX_UTF8_BYTES_PER_CHAR = 4
_GZIP_MAGIC = b"\x1f\x8b"
_GLOB_CHARS = re.compile(r"[*?[]")
# Lone surrogates decode from JSON escapes but cannot be encoded as UTF-8 by the tokenizer.
_SURROGATE = re.compile("[\ud800-\udfff]")
_POSITION_UNIT = {"jsonl": "line", "parquet": "row", "tfds": "example"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""  # the input file it was read from (its name under the corpus root)


@dataclass(frozen=True)
class CorpusSpec:
    path: str  # file, directory, or glob; "sample:<name>" names a file in synth/sample_data
    format: str = "auto"  # auto | jsonl | parquet | text | tfds
    id_field: str = "id"
    text_field: str = "text"
    max_docs: int | None = None  # stop after this many accepted documents
    max_doc_chars: int = 4_000_000  # longer texts are skipped as "too_long"
    tfds_split: str = "train"


@dataclass
class ReadStats:
    accepted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "skipped": dict(sorted(self.skipped.items()))}


@dataclass(frozen=True)
class Source:
    path: Location
    format: str  # jsonl | parquet | text | tfds
    name: str  # the id of a text file's document: its path below the folder or glob given


@dataclass(frozen=True)
class _Raw:
    """A record as a reader found it, before the checks common to all formats."""

    position: int  # 1-based line, row or example number; 0 for a whole text file
    id: object = None
    text: object = None
    problem: str | None = None  # a skip reason found while decoding the record itself


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def resolve_sample(name: str) -> Path:
    """The bundled file for "sample:<name>" (or just "<name>")."""
    files = SAMPLE_DIR.glob(f"*{_SAMPLE_SUFFIX}")
    available = sorted(p.name[: -len(_SAMPLE_SUFFIX)] for p in files)
    bare = name.removeprefix(SAMPLE_PREFIX)
    if bare not in available:
        choices = ", ".join(SAMPLE_PREFIX + a for a in available) or "none are installed"
        raise SynthError(f"unknown sample corpus {name!r}; available: {choices}")
    return SAMPLE_DIR / f"{bare}{_SAMPLE_SUFFIX}"


def _suffix_format(path: Location) -> str | None:
    name = PurePosixPath(str(path)).name.lower()
    return next((fmt for fmt, suffixes in _SUFFIXES.items() if name.endswith(suffixes)), None)


def _file_source(path: Location, name: str, fmt: str) -> Source:
    if fmt == "tfds":
        raise SynthError(f"{path}: a TFDS dataset is a directory (the one holding "
                         "dataset_info.json); give that directory")
    # A file named explicitly is read as text unless its suffix says otherwise.
    return Source(path, fmt if fmt != "auto" else _suffix_format(path) or "text", name)


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def _directory_sources(root: Path, fmt: str) -> list[Source]:
    if fmt == "tfds" or (fmt == "auto" and (root / "dataset_info.json").is_file()):
        return [Source(root, "tfds", root.name)]
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return _folder_sources(root, files, lambda name: root / name, fmt)


def _folder_sources(root: Location, files: list[str], locate: Callable[[str], Location], fmt: str) -> list[Source]:
    """The sources among a folder's files (named relative to it), in sorted order."""
    files = sorted(name for name in files if not _is_hidden(name))
    # Data files win over text files, which in a data folder are mostly READMEs.
    wanted = (fmt,) if fmt != "auto" else ("jsonl", "parquet")
    sources = [Source(locate(name), _suffix_format(name), name) for name in files
               if _suffix_format(name) in wanted]
    if not sources and fmt == "auto":
        sources = [Source(locate(name), "text", name) for name in files
                   if _suffix_format(name) == "text"]
    if not sources:
        kinds = [s for f in ((fmt,) if fmt != "auto" else _SUFFIXES) for s in _SUFFIXES[f]]
        raise SynthError(f"{root}: no {'/'.join(kinds)} files in this directory; "
                         "check the path or pass the format")
    return sources


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: text ids are relative to it."""
    parts = Path(pattern).parts[:-1]
    return Path(*itertools.takewhile(lambda part: not _GLOB_CHARS.search(part), parts))


def resolve_sources(spec: CorpusSpec) -> list[Source]:
    """The files (or the TFDS directory) `spec` names, in reading order."""
    if spec.format not in FORMATS:
        raise SynthError(f"unknown corpus format {spec.format!r}; use one of {', '.join(FORMATS)}")
    if is_url(spec.path):
        return _url_sources(spec)
    if spec.path.startswith(SAMPLE_PREFIX):
        sample = resolve_sample(spec.path)
        return [_file_source(sample, sample.name, spec.format)]
    path = Path(spec.path)
    if path.is_dir():
        return _directory_sources(path, spec.format)
    if path.exists():
        return [_file_source(path, path.name, spec.format)]
    matches = [Path(p) for p in sorted(glob.glob(spec.path, recursive=True)) if Path(p).is_file()]
    if not matches:
        raise SynthError(f"{spec.path}: no such file, directory or matching files; check the "
                         f"path (bundled corpora: {SAMPLE_PREFIX}pydocs, {SAMPLE_PREFIX}jargon)")
    root = _glob_root(spec.path)
    return [_file_source(p, p.relative_to(root).as_posix(), spec.format) for p in matches]


def _url_sources(spec: CorpusSpec) -> list[Source]:
    """Sources named by a URL: a glob, a folder (everything below it), or one file."""
    if spec.format == "tfds":
        raise SynthError(f"{spec.path}: TFDS datasets are read from a local directory")
    if _GLOB_CHARS.search(spec.path):
        found = match_urls(spec.path)
        if not found:
            raise SynthError(f"{spec.path}: no matching files; check the URL")
        root = spec.path[: _GLOB_CHARS.search(spec.path).start()].rpartition("/")[0]
        return [_file_source(m.path, m.path[len(root) + 1:], spec.format) for m in found]
    listing = url_files(spec.path)
    if listing is not None:
        root, files = listing
        return _folder_sources(root, files, lambda name: f"{root}/{name}", spec.format)
    if not match_urls(spec.path):
        raise SynthError(f"{spec.path}: no such file or folder; check the URL")
    return [_file_source(spec.path, spec.path.rpartition("/")[2], spec.format)]


def _unreadable(path: Location, error: BaseException) -> SynthError:
    if isinstance(error, PermissionError):
        return SynthError(f"cannot read {path}: permission denied; check its permissions")
    detail = " ".join(str(error).split()) or type(error).__name__
    return SynthError(f"cannot read {path}: {detail}; the file looks damaged or truncated, "
                      "re-create or re-download it")


def _parse_json_line(line: bytes, position: int, spec: CorpusSpec) -> _Raw:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _Raw(position, problem="non_utf8")
    try:
        # Some editors start a UTF-8 file with a byte-order mark, which JSON does not allow.
        record = json.loads(text.removeprefix("\ufeff") if position == 1 else text)
    except (ValueError, RecursionError):
        return _Raw(position, problem="malformed_json")
    if not isinstance(record, dict):
        return _Raw(position, problem="malformed_json")
    return _Raw(position, record.get(spec.id_field), record.get(spec.text_field))


def _jsonl_records(source: Source, spec: CorpusSpec) -> Iterator[_Raw]:
    try:
        with open_binary(source.path) as probe:
            compressed = probe.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
        with open_binary(source.path) as raw, (gzip.GzipFile(fileobj=raw) if compressed else raw) as lines:
            for position, line in enumerate(lines, 1):
                if not line.isspace():
                    yield _parse_json_line(line, position, spec)
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(source.path, error) from None


def _parquet_records(source: Source, spec: CorpusSpec) -> Iterator[_Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_binary(source.path) as handle:
            parquet = pq.ParquetFile(handle)
            names = set(parquet.schema_arrow.names)
            if spec.text_field not in names:
                for position in range(1, parquet.metadata.num_rows + 1):
                    yield _Raw(position, problem="missing_field")
                return
            columns = [spec.text_field] + ([spec.id_field] if spec.id_field in names else [])
            position = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                texts = batch.column(spec.text_field).to_pylist()
                ids = batch.column(spec.id_field).to_pylist() if len(columns) == 2 else [None] * len(texts)
                for doc_id, text in zip(ids, texts):
                    position += 1
                    yield _Raw(position, doc_id, text)
    except (OSError, pa.ArrowException) as error:
        raise _unreadable(source.path, error) from None


def _text_records(source: Source, spec: CorpusSpec) -> Iterator[_Raw]:
    try:
        if size(source.path) > _MAX_UTF8_BYTES_PER_CHAR * spec.max_doc_chars:
            yield _Raw(0, source.name, problem="too_long")
        else:
            with open_binary(source.path) as file:
                yield _Raw(0, source.name, file.read())
    except OSError as error:
        raise _unreadable(source.path, error) from None


def _tfds_records(source: Source, spec: CorpusSpec) -> Iterator[_Raw]:
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise SynthError(f"{source.path} is a TFDS dataset, and reading it needs "
                         "tensorflow-datasets: pip install nextlong-jax[tfds]") from None
    try:
        builder = tfds.builder_from_directory(source.path)
        dataset = builder.as_dataset(split=spec.tfds_split, shuffle_files=False)
        for position, example in enumerate(tfds.as_numpy(dataset), 1):
            yield _Raw(position, example.get(spec.id_field), example.get(spec.text_field))
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise _unreadable(source.path, error) from None


_READERS: dict[str, Callable[[Source, CorpusSpec], Iterator[_Raw]]] = {
    "jsonl": _jsonl_records,
    "parquet": _parquet_records,
    "text": _text_records,
    "tfds": _tfds_records,
}


def _as_str(value: object, allow_int: bool) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("non_utf8") from None
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise _Skip("non_utf8")
        return value
    if allow_int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise _Skip("missing_field")


def _document(raw: _Raw, spec: CorpusSpec, source: str) -> Document:
    """The record as a document, or `_Skip` with the reason it is unusable."""
    if raw.problem is not None:
        raise _Skip(raw.problem)
    text = _as_str(raw.text, allow_int=False)
    # Many corpora (Cosmopedia, say) have no id column: such a record is named by its text, which
    # keeps the name stable across runs and orders and makes an exact repeat a duplicate.
    doc_id = content_id(text) if raw.id is None or raw.id == "" else _as_str(raw.id, allow_int=True)
    if not text or text.isspace():
        raise _Skip("empty_text")
    if len(text) > spec.max_doc_chars:
        raise _Skip("too_long")
    return Document(doc_id, text, source)


def content_id(text: str) -> str:
    """The id of a document that has none: a hash of its text."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _explain(reason: str, spec: CorpusSpec) -> str:
    return {
        "malformed_json": "not a valid JSON object",
        "missing_field": f"needs a string {spec.text_field!r} field; an {spec.id_field!r} field, when "
                         "present, must be a string or an integer",
        "non_utf8": "not valid UTF-8",
        "empty_text": "the text is empty or only whitespace",
        "duplicate_id": "an earlier document has the same id",
        "too_long": f"the text is longer than max_doc_chars ({spec.max_doc_chars})",
    }[reason]


def _where(source: Source, position: int) -> str:
    unit = _POSITION_UNIT.get(source.format)
    return f"{source.path} {unit} {position}" if unit else str(source.path)


def _skip(source: Source, position: int, reason: str, spec: CorpusSpec, strict: bool) -> str:
    if strict:
        raise SynthError(f"{_where(source, position)}: {reason} ({_explain(reason, spec)}); fix the input, or run "
                         "without --strict to skip and count such records")
    return reason


def checked_records(source: Source, spec: CorpusSpec, strict: bool) -> Iterator[tuple[int, Document | str]]:
    """Every record of one source with its position: the document, or the reason it is skipped.

    Ids repeated across records are not checked here: that needs all sources (`_accepted`, or a
    grouping by id in the Beam runner)."""
    for raw in _READERS[source.format](source, spec):
        try:
            yield raw.position, _document(raw, spec, source.name)
        except _Skip as skip:
            yield raw.position, _skip(source, raw.position, skip.reason, spec, strict)


def duplicate_id(source: Source, position: int, spec: CorpusSpec, strict: bool) -> str:
    """The skip reason of a record whose id an earlier record (in reading order) has."""
    return _skip(source, position, "duplicate_id", spec, strict)


def _accepted(sources: list[Source], spec: CorpusSpec, stats: ReadStats,
              strict: bool) -> Iterator[Document]:
    seen: set[str] = set()
    for source in sources:
        for position, record in checked_records(source, spec, strict):
            if isinstance(record, Document) and record.id in seen:
                record = duplicate_id(source, position, spec, strict)
            if isinstance(record, str):
                stats.skipped[record] += 1
                continue
            seen.add(record.id)
            stats.accepted += 1
            yield record


def read_documents(spec: CorpusSpec, stats: ReadStats, strict: bool = False) -> Iterator[Document]:
    """The usable documents of `spec`, in a fixed order, counting the rest in `stats`.

    The path is resolved at once, so a missing corpus fails here rather than mid-pipeline.
    """
    sources = resolve_sources(spec)
    return itertools.islice(_accepted(sources, spec, stats, strict), spec.max_docs)


def _source_files(source: Source) -> list[Location]:
    if source.format != "tfds":
        return [source.path]
    return sorted((p for p in source.path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """A key for caches derived from the corpus: changes with the spec and with any file's
    path, size or modification time."""
    digest = hashlib.sha256(json.dumps([_READER_VERSION, asdict(spec)], sort_keys=True).encode())
    for source in resolve_sources(spec):
        for path in _source_files(source):
            digest.update(f"\0{signature(path)}".encode())
    return digest.hexdigest()
