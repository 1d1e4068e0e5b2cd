"""Typed configuration of a synthesis run, built once from flags and YAML and passed top-down.

Users see a flat set of options (command-line flags, and YAML keys of the same names); the run
sees them grouped by the stage that uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from synth.chunking import MIN_CHAR_LIMIT
from synth.corpus import CorpusSpec
from synth.embed import EmbeddingConfig
from synth.errors import SynthError
from synth.index import INDEX_KINDS, IndexConfig

STRATEGIES = ("nextlong", "random-negatives", "plain-concat", "knn-concat", "keyword-concat")
META_POSITIONS = ("head", "tail", "random")
REUSE_SCOPES = ("run", "shard")
COMPRESSIONS = ("none", "gzip")


@dataclass(frozen=True)
class ChunkingConfig:
    unit: str = "tokens"
    size: int = 512


@dataclass(frozen=True)
class MiningConfig:
    strategy: str = "nextlong"
    k: int | None = None  # negatives per meta-chunk; None: the paper's k from the lengths
    max_k: int | None = None  # cap of the automatic k; None: as many as the target length can hold
    headroom: float = 1.5  # the paper's w: the automatic k aims at headroom x the remaining tokens
    min_segment_tokens: int = 512  # room below this at a sequence's end is padded, not a new document
    dedup_threshold: float = 0.95
    max_reuse: int = 8  # uses of one corpus chunk as a placed negative, over the run or per shard
    reuse_scope: str = "run"
    meta_position: str = "head"  # where m_i goes among its negatives; head is the method
    overlap_threshold: float = 0.5  # reject a negative this share of whose token n-grams is in its meta-document
    shingle_tokens: int = 8  # n of those n-grams
    corpus_dedup: float | None = None  # Jaccard above which a corpus document repeats an earlier one; None: off
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig:
    out: Path = Path("out")
    seq_len: int = 32768
    doc_len: int | None = None  # tokens per extended document, several packed per sequence; None: seq_len
    negative_weight: float = 1.0
    num_shards: int = 8
    max_sequences: int | None = None
    compression: str = "none"
    cache_dir: Path | None = None  # default: OUT/.cache

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out / ".cache"


@dataclass(frozen=True)
class SynthConfig:
    meta: CorpusSpec
    corpus: CorpusSpec | None  # None: retrieve from the meta-documents themselves
    tokenizer: str = "llama3"
    embedder: str = "minilm"
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    strict: bool = False
    docs_per_block: int = 1024

    @property
    def retrieval_corpus(self) -> CorpusSpec:
        return self.corpus if self.corpus is not None else self.meta

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# Flat option name -> default. These are the flag names (with '-') and YAML keys.
FLAT_DEFAULTS: dict[str, object] = {
    "meta": None, "corpus": None, "out": None,
    "meta-format": "auto", "corpus-format": "auto",
    "id-field": "id", "text-field": "text",
    "max-meta-docs": None, "max-corpus-docs": None,
    "max-doc-chars": 4_000_000,
    "tokenizer": "llama3", "embedder": "minilm",
    "embed-device": "cpu", "embed-max-tokens": None, "trust-remote-code": False,
    "chunk-tokens": None, "chunk-chars": None,
    "seq-len": 32768, "doc-len": None, "k": None, "max-k": None, "headroom": 1.5, "min-segment-tokens": 512,
    "index": "faiss-flat", "index-params": None, "negative-weight": 1.0, "dedup-threshold": 0.95,
    "overlap-threshold": 0.5, "shingle-tokens": 8, "corpus-dedup": None, "max-reuse": 8, "reuse-scope": "run",
    "meta-position": "head",
    "num-shards": 8, "max-sequences": None, "seed": 0,
    "strategy": "nextlong", "compression": "none", "cache-dir": None,
    "strict": False, "docs-per-block": 1024,
}


def _spec(path: str, fmt: str, flat: dict, max_docs) -> CorpusSpec:
    return CorpusSpec(path=str(path), format=fmt, id_field=flat["id-field"],
                      text_field=flat["text-field"], max_docs=max_docs,
                      max_doc_chars=int(flat["max-doc-chars"]))


def _chunking(flat: dict) -> ChunkingConfig:
    tokens, chars = flat["chunk-tokens"], flat["chunk-chars"]
    if tokens is not None and chars is not None:
        raise SynthError("give --chunk-tokens or --chunk-chars, not both")
    if chars is not None:
        if int(chars) < MIN_CHAR_LIMIT:
            raise SynthError(f"--chunk-chars must be at least {MIN_CHAR_LIMIT}")
        return ChunkingConfig(unit="chars", size=int(chars))
    size = int(tokens) if tokens is not None else ChunkingConfig.size
    if size < 16:
        raise SynthError("--chunk-tokens must be at least 16")
    return ChunkingConfig(unit="tokens", size=size)


# IndexConfig fields a user may set; kind and seed have their own options.
INDEX_PARAMS = tuple(f.name for f in dataclasses.fields(IndexConfig) if f.name not in ("kind", "seed"))


def _index_params(value) -> dict[str, int]:
    """`--index-param KEY=VALUE` strings (repeated) or a YAML mapping -> IndexConfig keyword arguments."""
    if value is None:
        return {}
    pairs = value.items() if isinstance(value, dict) else (str(v).partition("=")[::2] for v in value)
    params = {}
    for key, raw in pairs:
        key = str(key).replace("-", "_")
        if key not in INDEX_PARAMS:
            raise SynthError(f"unknown index parameter {key!r}; known: {', '.join(INDEX_PARAMS)}")
        try:
            params[key] = int(raw)
        except (TypeError, ValueError):
            raise SynthError(f"index parameter {key} must be an integer, not {raw!r}") from None
    return params


def _choice(flat: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = str(flat[key])
    if value not in allowed:
        raise SynthError(f"--{key} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def build_config(flat: dict) -> SynthConfig:
    """Validate the merged flat options (defaults < YAML < flags) into a SynthConfig."""
    unknown = sorted(set(flat) - set(FLAT_DEFAULTS))
    if unknown:
        raise SynthError(f"unknown option(s): {', '.join(unknown)}")
    flat = {**FLAT_DEFAULTS, **{k: v for k, v in flat.items() if v is not None}}
    for required in ("meta", "out"):
        if flat[required] is None:
            raise SynthError(f"--{required} is required (or set it in --config)")
    seq_len = int(flat["seq-len"])
    if not 64 <= seq_len <= 2**20:
        raise SynthError("--seq-len must be between 64 and 1048576 tokens")
    doc_len = None if flat["doc-len"] is None else int(flat["doc-len"])
    if doc_len is not None and not 64 <= doc_len <= seq_len:
        raise SynthError(f"--doc-len must be between 64 and --seq-len ({seq_len}) tokens")
    if doc_len is not None and str(flat["strategy"]).endswith("-concat"):
        raise SynthError("--doc-len packs extended documents: it goes with nextlong or random-negatives")
    chunking = _chunking(flat)
    if chunking.unit == "tokens" and chunking.size >= seq_len:
        raise SynthError("--chunk-tokens must be smaller than --seq-len")
    k = flat["k"]
    if k is not None and str(k) != "auto":
        k = int(k)
        if k < 0:
            raise SynthError("--k must be >= 0 or 'auto'")
    else:
        k = None
    if not 0.0 <= float(flat["negative-weight"]) <= 1.0:
        raise SynthError("--negative-weight must be in [0, 1]")
    max_k = None if flat["max-k"] in (None, "auto") else int(flat["max-k"])
    if int(flat["num-shards"]) < 1 or int(flat["max-reuse"]) < 1 or (max_k is not None and max_k < 1):
        raise SynthError("--num-shards, --max-reuse and --max-k must be at least 1")
    if float(flat["headroom"]) <= 0 or int(flat["min-segment-tokens"]) < 0:
        raise SynthError("--headroom must be positive and --min-segment-tokens at least 0")
    corpus = flat["corpus"]
    return SynthConfig(
        meta=_spec(flat["meta"], flat["meta-format"], flat, flat["max-meta-docs"]),
        corpus=None if corpus is None or corpus == flat["meta"] else _spec(
            corpus, flat["corpus-format"], flat, flat["max-corpus-docs"]),
        tokenizer=str(flat["tokenizer"]),
        embedder=str(flat["embedder"]),
        embedding=EmbeddingConfig(
            device=str(flat["embed-device"]), trust_remote_code=bool(flat["trust-remote-code"]),
            max_tokens=None if flat["embed-max-tokens"] is None else int(flat["embed-max-tokens"])),
        chunking=chunking,
        index=IndexConfig(kind=_choice(flat, "index", INDEX_KINDS), seed=int(flat["seed"]),
                          **_index_params(flat["index-params"])),
        mining=MiningConfig(
            strategy=_choice(flat, "strategy", STRATEGIES), k=k, max_k=max_k,
            headroom=float(flat["headroom"]), min_segment_tokens=int(flat["min-segment-tokens"]),
            dedup_threshold=float(flat["dedup-threshold"]), max_reuse=int(flat["max-reuse"]),
            reuse_scope=_choice(flat, "reuse-scope", REUSE_SCOPES),
            meta_position=_choice(flat, "meta-position", META_POSITIONS),
            overlap_threshold=float(flat["overlap-threshold"]), shingle_tokens=int(flat["shingle-tokens"]),
            corpus_dedup=None if flat["corpus-dedup"] is None else float(flat["corpus-dedup"]),
            seed=int(flat["seed"])),
        output=OutputConfig(
            out=Path(flat["out"]), seq_len=seq_len, doc_len=doc_len,
            negative_weight=float(flat["negative-weight"]),
            num_shards=int(flat["num-shards"]),
            max_sequences=None if flat["max-sequences"] is None else int(flat["max-sequences"]),
            compression=_choice(flat, "compression", COMPRESSIONS),
            cache_dir=None if flat["cache-dir"] is None else Path(flat["cache-dir"])),
        strict=bool(flat["strict"]),
        docs_per_block=int(flat["docs-per-block"]),
    )
