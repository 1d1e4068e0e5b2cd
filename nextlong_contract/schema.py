"""The data contract between `nextlong-synth` (the writer) and `nextlong-train` (the reader).

A synthesis output directory holds TFRecord shards, one `tf.train.Example` per training sequence,
and `manifest.json`. Both sides import the names, roles, rules and manifest from here, and only
here; this module needs neither TensorFlow nor JAX, so either side imports it cheaply. Every reader
reads an output through `nextlong_contract.reader`.

Features, each of exactly `seq_len` values per sequence: `input_ids`, `token_roles`,
`segment_ids`, `positions` (int64) and `loss_weights` (float32); provenance, variable length:
`meta_doc_ids`, `negative_chunk_ids` (bytes), `piece_starts` (int64: the token offset of each placed
chunk, its joiner included) and `negative_scores` (float32, one per negative chunk id: its cosine to
the meta-chunk it was mined for). Readers ignore features they do not know, so outputs without the
last two still read (as empty lists) and older readers read newer outputs.

A manifest's `tokenizer` records the tokenizer the ids are of: its `name` as given to synthesis,
`vocab_size`, `vocab_sha256` (`vocabulary_sha256`; absent in outputs that predate it) and its special
ids. Readers check a model against it (`nextlong_jax.vocabulary`).

A manifest's `document_len` (set by `nextlong-synth --doc-len`) promises that every document of a
row starts at a multiple of it and ends before the next one: a row of seq_len / document_len
slots, one document (or padding) each. The trainer then attends within slots only (cheaper rows,
the same loss). Older readers ignore the key, and an output without it promises nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np

INT_FEATURES = ("input_ids", "token_roles", "segment_ids", "positions")
FLOAT_FEATURES = ("loss_weights",)
# Provenance, by value type (bytes, int64, float32); training ignores it.
PROVENANCE_FEATURES = {"meta_doc_ids": "bytes", "negative_chunk_ids": "bytes", "piece_starts": "int64",
                       "negative_scores": "float32"}
TRAINING_FEATURES = INT_FEATURES + FLOAT_FEATURES

ROLE_PAD, ROLE_META, ROLE_NEGATIVE = 0, 1, 2
ROLE_NAMES = {ROLE_PAD: "pad", ROLE_META: "meta", ROLE_NEGATIVE: "negative"}

MANIFEST = "manifest.json"
FORMAT = "nextlong-tfrecord"
# 2: shards carry their size in bytes, so a reader can tell a cut-off copy before reading it.
# (piece_starts, negative_scores and document_len needed no new version: readers of either side still read.)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ManifestError(ValueError):
    """A manifest that cannot be used, or shards that do not match it; the message names the file."""


def segment_starts(segment_ids: np.ndarray) -> np.ndarray:
    """bool [..., L]: the first token of each segment (padding, segment 0, excluded).

    THE RULE: such a token has loss weight 0, since nothing of its own segment precedes it. The
    writer sets it so; a reader that re-weights tokens must keep it.
    """
    segment_ids = np.asarray(segment_ids)
    starts = np.ones(segment_ids.shape, bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return starts & (segment_ids != 0)


def stream_sha256(stream: BinaryIO) -> str:
    """The digest a manifest states for a shard file, of its bytes read from `stream`: the writer
    records it, the reader checks it."""
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def vocabulary_sha256(vocab: dict[str, int]) -> str:
    """The digest a manifest states for its tokenizer's vocabulary (each token's string and id, added
    tokens included): the writer records it, a reader compares a model's tokenizer with it. Two
    tokenizers share it when the same ids mean the same strings, whatever their files look like."""
    by_id = sorted((i, t) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the manifest's directory
    sequences: int
    sha256: str
    bytes: int | None = None  # None in version-1 manifests


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says about a synthesis output; `extra` keeps the writer's reports
    (counts, config, tokenizer, ...) that readers pass through but do not interpret."""

    seq_len: int
    compression: str  # "none" or "gzip"
    shards: tuple[ShardEntry, ...]
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    # Documents per row start at multiples of this and never cross one (several documents packed into
    # each row); None: not declared, a document may start anywhere (one per row, or older outputs).
    document_len: int | None = None

    @property
    def tf_compression(self) -> str:
        """As `tf.data` spells it."""
        return "GZIP" if self.compression == "gzip" else ""

    def to_dict(self) -> dict:
        return {**self.extra, "format": FORMAT, "format_version": self.version, "seq_len": self.seq_len,
                "document_len": self.document_len, "compression": self.compression,
                "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Manifest:
        version = _version(data)
        if version not in READABLE_VERSIONS:
            raise ManifestError(f"{where}: manifest format version {version!r}; this reader knows "
                                f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade nextlong-jax or re-synthesize")
        try:
            shards = tuple(ShardEntry(file=str(s["file"]), sequences=int(s["sequences"]), sha256=str(s["sha256"]),
                                      bytes=None if s.get("bytes") is None else int(s["bytes"]))
                           for s in data["shards"])
            seq_len, compression = int(data["seq_len"]), str(data.get("compression", "none"))
            document_len = None if data.get("document_len") is None else int(data["document_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: not a synthesis manifest (bad or missing {e})") from None
        if document_len is not None and not (0 < document_len <= seq_len and seq_len % document_len == 0):
            raise ManifestError(f"{where}: document_len {document_len} does not divide seq_len {seq_len}")
        known = {"format", "format_version", "seq_len", "document_len", "compression", "shards"}
        return cls(seq_len, compression, shards, version, {k: v for k, v in data.items() if k not in known},
                   document_len)


def _version(data: dict) -> object:
    if "format_version" in data:
        return data["format_version"]
    if data.get("format") == f"{FORMAT}/1":  # how version 1 named itself
        return 1
    return data.get("format")
