"""Typed configuration of a synthesis run, built once from flags and YAML and passed top-down.

Users see a flat set of options (command-line flags, and YAML keys of the same names); the run
sees them grouped by the stage that uses them. `OPTIONS` lists every flat option once, with the
dataclass field its default is read from: the flat defaults, the command line (`synth.cli`) and
each help line's "(default: ...)" all come from it, so no default is written twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from synth.chunking import MIN_CHAR_LIMIT
from synth.corpus import FORMATS, CorpusSpec
from synth.embed import EMBED_BACKENDS, EmbeddingConfig
from synth.errors import SynthError
from synth.index.base import INDEX_KINDS, IndexConfig
from synth.staging import local_or_staged
from synth.strategies import Strategy

STRATEGIES = tuple(strategy.value for strategy in Strategy)
META_POSITIONS = ("head", "tail", "random")
REUSE_SCOPES = ("run", "shard")
SHORT_META = ("skip", "merge")
JOINERS = ("auto", "none")
COMPRESSIONS = ("none", "gzip")


@dataclass(frozen=True)
class ChunkingConfig:
    unit: str = "tokens"
    size: int = 512


@dataclass(frozen=True)
class MiningConfig:
    strategy: Strategy = Strategy.NEXTLONG
    k: int | None = None  # negatives per meta-chunk; None: the paper's k*s in tokens (`assemble.negative_quota`)
    max_k: int | None = None  # cap of the count with the automatic k; None: the token budget alone
    headroom: float = 1.5  # the paper's w: the automatic k aims at headroom x the remaining tokens
    min_segment_tokens: int = 512  # room below this at a sequence's end is padded, not a new document
    dedup_threshold: float = 0.95
    max_reuse: int = 8  # uses of one corpus chunk as a placed negative, over the run or per shard
    reuse_scope: str = "run"
    meta_position: str = "head"  # where m_i goes among its negatives; head is the method
    # A meta-document of one chunk has nothing to bridge: it is skipped, or merged with the next short
    # ones of its source file until the group has this many chunks.
    min_meta_chunks: int = 2
    short_meta: str = "skip"
    joiner: str = "auto"  # between texts that do not continue each other: auto (a newline where needed), none
    overlap_threshold: float = 0.5  # reject a negative this share of whose token n-grams is in its meta-document
    shingle_tokens: int = 8  # n of those n-grams
    corpus_dedup: float | None = None  # Jaccard above which a corpus document repeats an earlier one; None: off
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig:
    out: Path = Path("out")
    seq_len: int = 32768
    doc_len: int | None = None  # --doc-len as given; `document_len` is what every stage uses
    negative_weight: float = 1.0
    num_shards: int = 8
    max_sequences: int | None = None
    compression: str = "none"
    cache_dir: Path | None = None  # default: OUT/.cache
    out_url: str | None = None  # where `out` is pushed (`synth.staging`); None: `out` is the output itself
    cache_url: str | None = None  # the same for `cache_dir`

    @property
    def document_len(self) -> int:
        """Tokens per extended document: --doc-len packs several into each sequence; without it one
        document spans the sequence."""
        return self.doc_len if self.doc_len is not None else self.seq_len

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out / ".cache"

    @property
    def staged(self) -> bool:
        """Whether the output or the cache is at a URL, pushed from local staging (`synth.staging`)."""
        return bool(self.out_url or self.cache_url)


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
    if isinstance(value, Enum):
        return value.value
    return value


IO = "inputs and output"
MODEL = "tokenizer, chunking, embedding, index"
LAYOUT = "negatives and layout"


def _default_of(cls: type, name: str) -> Any:
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


@dataclass(frozen=True)
class Option:
    flag: str
    group: str
    help: str
    default_from: tuple[type, str] | None = None  # (dataclass, field) holding the default
    arguments: dict = field(default_factory=dict)  # more argparse keywords: type, choices, metavar, action
    cli: str | None = None  # the flag, where it differs from the YAML key

    @property
    def default(self) -> Any:
        return None if self.default_from is None else _default_of(*self.default_from)

    @property
    def help_text(self) -> str:
        """The help line, ending in the default where there is one to state."""
        if not self.help or self.default is None or self.arguments.get("action") == "store_true":
            return self.help
        return f"{self.help} (default: {self.default})"


def _int(**more) -> dict:
    return {"type": int, **more}


def _float(**more) -> dict:
    return {"type": float, **more}


OPTIONS: tuple[Option, ...] = (
    Option("meta", IO, "meta-documents: the short documents to extend"),
    Option("corpus", IO, "retrieval corpus for negatives (default: the meta-documents)"),
    Option("out", IO, "output directory for shards, manifest.json and summary.md; a URL (gs://, s3://, ...) "
           "with --runner beam"),
    Option("meta-format", IO, "format of --meta", (CorpusSpec, "format"), {"choices": FORMATS}),
    Option("corpus-format", IO, "format of --corpus", (CorpusSpec, "format"), {"choices": FORMATS}),
    Option("id-field", IO, "id field of JSONL/Parquet/TFDS records; records without one are named by a hash "
                           "of their text", (CorpusSpec, "id_field")),
    Option("text-field", IO, "text field of records", (CorpusSpec, "text_field")),
    Option("max-meta-docs", IO, "read at most this many meta-documents", arguments=_int()),
    Option("max-corpus-docs", IO, "read at most this many corpus documents", arguments=_int()),
    Option("max-doc-chars", IO, "skip (and count) longer documents", (CorpusSpec, "max_doc_chars"), _int()),
    Option("strict", IO, "fail on the first bad record instead of counting and skipping it",
           (SynthConfig, "strict"), {"action": "store_true", "default": None}),
    Option("cache-dir", IO, "chunk, embedding and index cache (default: OUT/.cache); a URL with --runner beam"),
    Option("tokenizer", MODEL, "'llama3' (bundled), a tokenizer.json or a HF tokenizer directory; lengths are "
                               "counted in its tokens", (SynthConfig, "tokenizer")),
    Option("chunk-tokens", MODEL, f"chunk size in tokens (default: {ChunkingConfig.size})", arguments=_int()),
    Option("chunk-chars", MODEL, "chunk size in characters instead (the paper: 2048)", arguments=_int()),
    Option("embedder", MODEL, "'minilm' (bundled all-MiniLM-L6-v2), 'hashing[:DIM]', or a local "
                              "sentence-transformers directory", (SynthConfig, "embedder")),
    Option("embed-backend", MODEL, "torch (sentence-transformers) or jax (the same BERT-family encoders on jax's "
                                   "devices: TPU, GPU or CPU, data-parallel)", (EmbeddingConfig, "backend"),
           {"choices": EMBED_BACKENDS}),
    Option("embed-device", MODEL, "where the torch backend runs: cpu, cuda, cuda:1, mps, ...",
           (EmbeddingConfig, "device")),
    Option("embed-max-tokens", MODEL, "the encoder's window in its own tokens, up to the positions the model "
                                      "has (default: the model's max_seq_length; MiniLM 256). Longer chunks are "
                                      "counted in the summary", arguments=_int()),
    Option("trust-remote-code", MODEL, "allow an embedder that ships its own Python code (e.g. "
                                       "jina-embeddings-v3) to run it", (EmbeddingConfig, "trust_remote_code"),
           {"action": "store_true", "default": None}),
    Option("index", MODEL, "nearest-neighbour index", (IndexConfig, "kind"), {"choices": INDEX_KINDS}),
    Option("index-params", MODEL, "index tuning, repeatable: nlist, nprobe, pq_m (faiss-ivfpq); hnsw_m, "
                                  "ef_search, ef_construction (faiss-hnsw); scann_leaves, scann_leaves_to_search, "
                                  "scann_part_vectors (scann: one searcher per that many vectors, built one at a "
                                  "time, results merged). Unset ones keep their defaults (nlist, pq_m and the ScaNN "
                                  "leaves follow the corpus size). YAML: index-params: {nprobe: 32}",
           arguments={"action": "append", "metavar": "KEY=VALUE"}, cli="index-param"),
    Option("strategy", LAYOUT, "nextlong; the paper's baselines: random-negatives, plain-concat (the "
                               "meta-documents back to back), knn-concat (ordered by a nearest-neighbour walk, as "
                               "ICLM), keyword-concat (grouped by a TF-IDF keyword, in the spirit of Quest)",
           (MiningConfig, "strategy"), {"choices": STRATEGIES}),
    Option("meta-position", LAYOUT, "where each meta-chunk goes among its negatives: head (the method), tail or "
                                    "random (the paper's position ablation)", (MiningConfig, "meta_position"),
           {"choices": META_POSITIONS}),
    Option("seq-len", LAYOUT, "tokens per training sequence", (OutputConfig, "seq_len"), _int()),
    Option("doc-len", LAYOUT, "tokens per extended document, several packed into each --seq-len sequence with "
                              "segment ids (the authors' 512K data: --doc-len 65536 --seq-len 524288); default: "
                              "one document spans the sequence", arguments=_int()),
    Option("k", LAYOUT, "negatives per meta-chunk, a count; or 'auto' (default): the paper's k times the negatives' "
                        "length, in tokens: the negatives after each meta-chunk take at most (seq_len*w - meta "
                        "tokens) / meta chunks tokens. Either way, those before the second meta-chunk leave room "
                        "for it"),
    Option("max-k", LAYOUT, "upper bound of the count of negatives per meta-chunk with --k auto (default 'auto': none, "
                            "the token budget alone, so one meta-document spans the whole sequence)"),
    Option("headroom", LAYOUT, "the paper's w in the automatic k (--k), the extended document then cut at its length. "
                               "Above 1 the meta-chunks after the cut are dropped (counted in the summary): on the "
                               "bundled corpus 1.5 keeps 82-86%% of meta tokens, 1.0 84-100%% (bench/synth.py part 6)",
           (MiningConfig, "headroom"), _float()),
    Option("min-meta-chunks", LAYOUT, "meta-documents with fewer chunks have no dependency to bridge: they are "
                                      "skipped (counted) or merged, as --short-meta says; 1 keeps them all",
           (MiningConfig, "min_meta_chunks"), _int()),
    Option("short-meta", LAYOUT, "what happens to a meta-document below --min-meta-chunks: skip, or merge it with "
                                 "the next short documents of the same input file into one meta-document",
           (MiningConfig, "short_meta"), {"choices": SHORT_META}),
    Option("joiner", LAYOUT, "what separates two texts that do not continue each other (a chunk and the next "
                             "one from another document): auto, a newline unless the first already ends in "
                             "whitespace, counted in the length and weighted as the text it precedes; none "
                             "glues them", (MiningConfig, "joiner"), {"choices": JOINERS}),
    Option("min-segment-tokens", LAYOUT, "pad the end of a sequence rather than start a meta-document there "
                                         "with less room than this", (MiningConfig, "min_segment_tokens"), _int()),
    Option("negative-weight", LAYOUT, "loss weight of negative tokens, 0..1 (1.0 = the paper)",
           (OutputConfig, "negative_weight"), _float()),
    Option("dedup-threshold", LAYOUT, "drop candidates more similar than this cosine",
           (MiningConfig, "dedup_threshold"), _float()),
    Option("overlap-threshold", LAYOUT, "drop candidates sharing at least this share of their token n-grams "
                                        "with ANY chunk of the meta-document; above 1 turns it off",
           (MiningConfig, "overlap_threshold"), _float()),
    Option("shingle-tokens", LAYOUT, "n of those token n-grams", (MiningConfig, "shingle_tokens"), _int()),
    Option("corpus-dedup", LAYOUT, "near-deduplicate the retrieval corpus first (MinHash LSH over the same "
                                   "n-grams): a document this similar to an earlier one never gives negatives "
                                   "(e.g. 0.8; default off)", arguments=_float(metavar="JACCARD")),
    Option("max-reuse", LAYOUT, "placements of one corpus chunk as a negative, over the run or per shard as "
                                "--reuse-scope says", (MiningConfig, "max_reuse"), _int()),
    Option("reuse-scope", LAYOUT, "run: at most --max-reuse in all shards together; shard: in each",
           (MiningConfig, "reuse_scope"), {"choices": REUSE_SCOPES}),
    Option("num-shards", LAYOUT, "output shards", (OutputConfig, "num_shards"), _int()),
    Option("max-sequences", LAYOUT, "stop after this many sequences in all (same budget across strategies)",
           arguments=_int()),
    Option("compression", LAYOUT, "TFRecord compression", (OutputConfig, "compression"), {"choices": COMPRESSIONS}),
    Option("seed", LAYOUT, "seed of every random choice", (MiningConfig, "seed"), _int()),
    Option("docs-per-block", LAYOUT, "", (SynthConfig, "docs_per_block"), _int()),  # tests only: no help
)

# Flag (and YAML key) -> default: what `build_config` merges YAML and flags over.
FLAT_DEFAULTS: dict[str, Any] = {option.flag: option.default for option in OPTIONS}


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
    if doc_len is not None and not (64 <= doc_len <= seq_len and seq_len % doc_len == 0):
        raise SynthError(f"--doc-len must divide --seq-len ({seq_len}) and be at least 64 tokens: each document "
                         "gets its own slot of --doc-len tokens")
    strategy = Strategy(_choice(flat, "strategy", STRATEGIES))
    if doc_len is not None and not strategy.extends:
        extending = " or ".join(s for s in Strategy if s.extends)
        raise SynthError(f"--doc-len packs extended documents: it goes with {extending}")
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
    if int(flat["min-meta-chunks"]) < 1:
        raise SynthError("--min-meta-chunks must be at least 1")
    corpus = flat["corpus"]
    out, out_url = local_or_staged(str(flat["out"]))
    cache_dir, cache_url = (None, None) if flat["cache-dir"] is None else local_or_staged(str(flat["cache-dir"]))
    return SynthConfig(
        meta=_spec(flat["meta"], flat["meta-format"], flat, flat["max-meta-docs"]),
        corpus=None if corpus is None or corpus == flat["meta"] else _spec(
            corpus, flat["corpus-format"], flat, flat["max-corpus-docs"]),
        tokenizer=str(flat["tokenizer"]),
        embedder=str(flat["embedder"]),
        embedding=EmbeddingConfig(
            backend=_choice(flat, "embed-backend", EMBED_BACKENDS), device=str(flat["embed-device"]),
            trust_remote_code=bool(flat["trust-remote-code"]),
            max_tokens=None if flat["embed-max-tokens"] is None else int(flat["embed-max-tokens"])),
        chunking=chunking,
        index=IndexConfig(kind=_choice(flat, "index", INDEX_KINDS), seed=int(flat["seed"]),
                          **_index_params(flat["index-params"])),
        mining=MiningConfig(
            strategy=strategy, k=k, max_k=max_k,
            headroom=float(flat["headroom"]), min_segment_tokens=int(flat["min-segment-tokens"]),
            dedup_threshold=float(flat["dedup-threshold"]), max_reuse=int(flat["max-reuse"]),
            reuse_scope=_choice(flat, "reuse-scope", REUSE_SCOPES),
            meta_position=_choice(flat, "meta-position", META_POSITIONS),
            min_meta_chunks=int(flat["min-meta-chunks"]), short_meta=_choice(flat, "short-meta", SHORT_META),
            joiner=_choice(flat, "joiner", JOINERS),
            overlap_threshold=float(flat["overlap-threshold"]), shingle_tokens=int(flat["shingle-tokens"]),
            corpus_dedup=None if flat["corpus-dedup"] is None else float(flat["corpus-dedup"]),
            seed=int(flat["seed"])),
        output=OutputConfig(
            out=out, out_url=out_url, seq_len=seq_len, doc_len=doc_len,
            negative_weight=float(flat["negative-weight"]),
            num_shards=int(flat["num-shards"]),
            max_sequences=None if flat["max-sequences"] is None else int(flat["max-sequences"]),
            compression=_choice(flat, "compression", COMPRESSIONS),
            cache_dir=cache_dir, cache_url=cache_url),
        strict=bool(flat["strict"]),
        docs_per_block=int(flat["docs-per-block"]),
    )
