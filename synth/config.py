"""Typed configuration of a synthesis run, built once from flags and YAML and passed top-down.

Users see a flat set of options (command-line flags, and YAML keys of the same names); the run
sees them grouped by the stage that uses them. Each option is declared once, as the field it sets
(`synth.options.option`: flag, help, conversion, and the field's default); the few that fill more
than one field, or one field from two flags, are the rows of `COMPOSITE`, built by `build_config`.
`OPTIONS` lists them all: the command line (`synth.cli`) and the presets' keys come from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from synth.chunking import MIN_CHAR_LIMIT
from synth.corpus import FORMATS, CorpusSpec
from synth.embed import EmbeddingConfig
from synth.errors import SynthError
from synth.index.base import IndexConfig
from synth.options import IO, LAYOUT, MODEL, Option, declared, field_default, option, read
from synth.staging import local_or_staged
from synth.strategies import Strategy

STRATEGIES = tuple(strategy.value for strategy in Strategy)
META_POSITIONS = ("head", "tail", "random")
REUSE_SCOPES = ("run", "shard")
SHORT_META = ("skip", "merge")
JOINERS = ("auto", "none")
COMPRESSIONS = ("none", "gzip")


def _count_or_auto(value: str) -> int | None:
    return None if value == "auto" else int(value)


@dataclass(frozen=True)
class ChunkingConfig:
    unit: str = "tokens"
    size: int = 512


@dataclass(frozen=True)
class MiningConfig:
    strategy: Strategy = option(
        "strategy", LAYOUT, "nextlong; the paper's baselines: random-negatives, plain-concat (the meta-documents back "
        "to back), knn-concat (ordered by a nearest-neighbour walk, as ICLM), keyword-concat (grouped by a TF-IDF "
        "keyword, in the spirit of Quest)", Strategy.NEXTLONG, choices=STRATEGIES, parse=Strategy)
    # None: the paper's k*s in tokens (`assemble.negative_quota`)
    k: int | None = option(
        "k", LAYOUT, "negatives per meta-chunk, a count; or 'auto' (default): the paper's k times the negatives' "
        "length, in tokens: the negatives after each meta-chunk take at most (seq_len*w - meta tokens) / meta "
        "chunks tokens. Either way, those before the second meta-chunk leave room for it", None, parse=_count_or_auto)
    max_k: int | None = option(
        "max-k", LAYOUT, "upper bound of the count of negatives per meta-chunk with --k auto (default 'auto': none, "
        "the token budget alone, so one meta-document spans the whole sequence)", None, parse=_count_or_auto)
    headroom: float = option(
        "headroom", LAYOUT, "the paper's w in the automatic k (--k), the extended document then cut at its length. "
        "Above 1 the meta-chunks after the cut are dropped (counted in the summary): on the bundled corpus 1.5 keeps "
        "82-86%% of meta tokens, 1.0 84-100%% (bench/synth.py part 6)", 1.5, type=float)
    min_segment_tokens: int = option(
        "min-segment-tokens", LAYOUT, "pad the end of a sequence rather than start a meta-document there with less "
        "room than this", 512, type=int)
    dedup_threshold: float = option("dedup-threshold", LAYOUT, "drop candidates more similar than this cosine",
                                    0.95, type=float)
    max_reuse: int = option(
        "max-reuse", LAYOUT, "placements of one corpus chunk as a negative, over the run or per shard as "
        "--reuse-scope says", 8, type=int)
    reuse_scope: str = option("reuse-scope", LAYOUT, "run: at most --max-reuse in all shards together; shard: in each",
                              "run", choices=REUSE_SCOPES)
    meta_position: str = option(
        "meta-position", LAYOUT, "where each meta-chunk goes among its negatives: head (the method), tail or random "
        "(the paper's position ablation)", "head", choices=META_POSITIONS)
    min_meta_chunks: int = option(
        "min-meta-chunks", LAYOUT, "meta-documents with fewer chunks have no dependency to bridge: they are skipped "
        "(counted) or merged, as --short-meta says; 1 keeps them all", 2, type=int)
    short_meta: str = option(
        "short-meta", LAYOUT, "what happens to a meta-document below --min-meta-chunks: skip, or merge it with the "
        "next short documents of the same input file into one meta-document", "skip", choices=SHORT_META)
    joiner: str = option(
        "joiner", LAYOUT, "what separates two texts that do not continue each other (a chunk and the next one from "
        "another document): auto, a newline unless the first already ends in whitespace, counted in the length "
        "and weighted as the text it precedes; none glues them", "auto", choices=JOINERS)
    overlap_threshold: float = option(
        "overlap-threshold", LAYOUT, "drop candidates sharing at least this share of their token n-grams with ANY "
        "chunk of the meta-document; above 1 turns it off", 0.5, type=float)
    shingle_tokens: int = option("shingle-tokens", LAYOUT, "n of those token n-grams", 8, type=int)
    corpus_dedup: float | None = option(
        "corpus-dedup", LAYOUT, "near-deduplicate the retrieval corpus first (MinHash LSH over the same n-grams): a "
        "document this similar to an earlier one never gives negatives (e.g. 0.8; default off)", None, type=float,
        metavar="JACCARD")
    seed: int = option("seed", LAYOUT, "seed of every random choice", 0, type=int)

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise SynthError("--k must be >= 0 or 'auto'")
        if self.max_reuse < 1 or (self.max_k is not None and self.max_k < 1):
            raise SynthError("--max-reuse and --max-k must be at least 1")
        if self.headroom <= 0 or self.min_segment_tokens < 0:
            raise SynthError("--headroom must be positive and --min-segment-tokens at least 0")
        if self.min_meta_chunks < 1:
            raise SynthError("--min-meta-chunks must be at least 1")


@dataclass(frozen=True)
class OutputConfig:
    out: Path = Path("out")  # `COMPOSITE`'s out: the local side of a URL too
    seq_len: int = option("seq-len", LAYOUT, "tokens per training sequence", 32768, type=int)
    # `document_len` is what every stage uses
    doc_len: int | None = option(
        "doc-len", LAYOUT, "tokens per extended document, several packed into each --seq-len sequence with segment "
        "ids (the authors' 512K data: --doc-len 65536 --seq-len 524288); default: one document spans the sequence",
        None, type=int)
    negative_weight: float = option("negative-weight", LAYOUT, "loss weight of negative tokens, 0..1 (1.0 = the paper)",
                                    1.0, type=float)
    num_shards: int = option("num-shards", LAYOUT, "output shards", 8, type=int)
    max_sequences: int | None = option(
        "max-sequences", LAYOUT, "stop after this many sequences in all (same budget across strategies)", None,
        type=int)
    compression: str = option("compression", LAYOUT, "TFRecord compression", "none", choices=COMPRESSIONS)
    cache_dir: Path | None = None  # default: OUT/.cache
    out_url: str | None = None  # where `out` is pushed (`synth.staging`); None: `out` is the output itself
    cache_url: str | None = None  # the same for `cache_dir`

    def __post_init__(self) -> None:
        if not 64 <= self.seq_len <= 2**20:
            raise SynthError("--seq-len must be between 64 and 1048576 tokens")
        if self.doc_len is not None and not (64 <= self.doc_len <= self.seq_len and self.seq_len % self.doc_len == 0):
            raise SynthError(f"--doc-len must divide --seq-len ({self.seq_len}) and be at least 64 tokens: each "
                             "document gets its own slot of --doc-len tokens")
        if not 0.0 <= self.negative_weight <= 1.0:
            raise SynthError("--negative-weight must be in [0, 1]")
        if self.num_shards < 1:
            raise SynthError("--num-shards must be at least 1")

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
    tokenizer: str = option("tokenizer", MODEL, "'llama3' (bundled), a tokenizer.json or a HF tokenizer directory; "
                                                "lengths are counted in its tokens", "llama3")
    embedder: str = option("embedder", MODEL, "'minilm' (bundled all-MiniLM-L6-v2), 'hashing[:DIM]', or a local "
                                              "sentence-transformers directory", "minilm")
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    strict: bool = option("strict", IO, "fail on the first bad record instead of counting and skipping it", False,
                          action="store_true")
    docs_per_block: int = option("docs-per-block", LAYOUT, "", 1024, type=int)  # tests only: no help

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


# The options that fill more than one field, or one field from two flags.
COMPOSITE: tuple[Option, ...] = (
    Option("meta", IO, "meta-documents: the short documents to extend"),
    Option("corpus", IO, "retrieval corpus for negatives (default: the meta-documents)"),
    Option("out", IO, "output directory for shards, manifest.json and summary.md; a URL (gs://, s3://, ...) "
           "with --runner beam"),
    Option("meta-format", IO, "format of --meta", field_default(CorpusSpec, "format"), {"choices": FORMATS}),
    Option("corpus-format", IO, "format of --corpus", field_default(CorpusSpec, "format"), {"choices": FORMATS}),
    Option("id-field", IO, "id field of JSONL/Parquet/TFDS records; records without one are named by a hash "
                           "of their text", field_default(CorpusSpec, "id_field")),
    Option("text-field", IO, "text field of records", field_default(CorpusSpec, "text_field")),
    Option("max-meta-docs", IO, "read at most this many meta-documents", arguments={"type": int}),
    Option("max-corpus-docs", IO, "read at most this many corpus documents", arguments={"type": int}),
    Option("max-doc-chars", IO, "skip (and count) longer documents", field_default(CorpusSpec, "max_doc_chars"),
           {"type": int}),
    Option("cache-dir", IO, "chunk, embedding and index cache (default: OUT/.cache); a URL with --runner beam"),
    Option("chunk-tokens", MODEL, f"chunk size in tokens (default: {ChunkingConfig.size})", arguments={"type": int}),
    Option("chunk-chars", MODEL, "chunk size in characters instead (the paper: 2048)", arguments={"type": int}),
    Option("index-params", MODEL, "index tuning, repeatable: nlist, nprobe, pq_m (faiss-ivfpq); hnsw_m, "
                                  "ef_search, ef_construction (faiss-hnsw); scann_leaves, scann_leaves_to_search, "
                                  "scann_part_vectors (scann: one searcher per that many vectors, built one at a "
                                  "time, results merged). Unset ones keep their defaults (nlist, pq_m and the ScaNN "
                                  "leaves follow the corpus size). YAML: index-params: {nprobe: 32}",
           arguments={"action": "append", "metavar": "KEY=VALUE"}, cli="index-param"),
)

# Every option, each once: the command line's flags (grouped by `group`) and the presets' keys.
OPTIONS: tuple[Option, ...] = COMPOSITE + tuple(
    opt for cls in (SynthConfig, EmbeddingConfig, IndexConfig, MiningConfig, OutputConfig) for _, opt in declared(cls))
FLAGS = frozenset(opt.flag for opt in OPTIONS)
COMPOSITE_BY_FLAG = {opt.flag: opt for opt in COMPOSITE}


def _composite(flat: dict, flag: str):
    """A `COMPOSITE` option's value, converted as its row declares; None where unset."""
    return None if flat.get(flag) is None else COMPOSITE_BY_FLAG[flag].convert(flat[flag])


def _spec(flat: dict, which: str) -> CorpusSpec:
    """The corpus spec of --meta or --corpus (`which`), with the options both share."""
    given = {"format": _composite(flat, f"{which}-format"), "max_docs": _composite(flat, f"max-{which}-docs"),
             **{name: _composite(flat, flag) for name, flag in (("id_field", "id-field"), ("text_field", "text-field"),
                                                                 ("max_doc_chars", "max-doc-chars"))}}
    return CorpusSpec(path=str(flat[which]), **{k: v for k, v in given.items() if v is not None})


def _chunking(flat: dict, seq_len: int) -> ChunkingConfig:
    tokens, chars = _composite(flat, "chunk-tokens"), _composite(flat, "chunk-chars")
    if tokens is not None and chars is not None:
        raise SynthError("give --chunk-tokens or --chunk-chars, not both")
    if chars is not None:
        if chars < MIN_CHAR_LIMIT:
            raise SynthError(f"--chunk-chars must be at least {MIN_CHAR_LIMIT}")
        return ChunkingConfig(unit="chars", size=chars)
    size = tokens if tokens is not None else ChunkingConfig.size
    if size < 16:
        raise SynthError("--chunk-tokens must be at least 16")
    if size >= seq_len:
        raise SynthError("--chunk-tokens must be smaller than --seq-len")
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


def _output(flat: dict) -> OutputConfig:
    out, out_url = local_or_staged(str(flat["out"]))
    cache_dir, cache_url = (None, None) if flat.get("cache-dir") is None else local_or_staged(str(flat["cache-dir"]))
    return read(OutputConfig, flat, out=out, out_url=out_url, cache_dir=cache_dir, cache_url=cache_url)


def build_config(flat: dict) -> SynthConfig:
    """Validate the merged flat options (YAML < flags; unset ones keep the fields' defaults) into a SynthConfig."""
    unknown = sorted(set(flat) - FLAGS)
    if unknown:
        raise SynthError(f"unknown option(s): {', '.join(unknown)}")
    flat = {k: v for k, v in flat.items() if v is not None}
    for required in ("meta", "out"):
        if required not in flat:
            raise SynthError(f"--{required} is required (or set it in --config)")
    _composite(flat, "corpus-format")  # checked even where the meta-documents are the corpus
    output, mining = _output(flat), read(MiningConfig, flat)
    if output.doc_len is not None and not mining.strategy.extends:
        extending = " or ".join(s for s in Strategy if s.extends)
        raise SynthError(f"--doc-len packs extended documents: it goes with {extending}")
    corpus = flat.get("corpus")
    return read(
        SynthConfig, flat,
        meta=_spec(flat, "meta"),
        corpus=None if corpus is None or corpus == flat["meta"] else _spec(flat, "corpus"),
        embedding=read(EmbeddingConfig, flat),
        chunking=_chunking(flat, output.seq_len),
        index=read(IndexConfig, flat, seed=mining.seed, **_index_params(flat.get("index-params"))),
        mining=mining, output=output)
