"""Per-shard statistics and the run summary (deterministic: no timings, so reruns match)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from synth.assemble import PackStats
from synth.negatives import SIMILARITY_BINS, MiningStats
from synth.strategies import Strategy


@dataclass
class ShardReport:
    file: str
    sequences: int
    sha256: str
    bytes: int | None = None
    tokens_by_role: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    truncated_tokens: int = 0
    documents_used: int = 0
    joiner_tokens: dict[str, int] = field(default_factory=dict)
    meta_tokens_offered: int = 0
    meta_tokens_placed: int = 0
    meta_chunks_dropped: int = 0
    meta_documents_skipped: int = 0
    single_meta_chunk_segments: int = 0
    negatives: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    short_of_k: int = 0
    similarity_hist: list[int] = field(default_factory=lambda: [0] * 40)
    similarity_sum: float = 0.0

    @classmethod
    def collect(cls, file: str, sequences: int, sha256: str, size: int, pack: PackStats,
                mining: MiningStats) -> "ShardReport":
        return cls(file=file, sequences=sequences, sha256=sha256, bytes=size,
                   tokens_by_role=dict(sorted(pack.tokens_by_role.items())),
                   segments=pack.segments, truncated_tokens=pack.truncated_tokens,
                   documents_used=pack.documents_used, joiner_tokens=dict(sorted(pack.joiner_tokens.items())),
                   meta_tokens_offered=pack.meta_tokens_offered, meta_tokens_placed=pack.meta_tokens_placed,
                   meta_chunks_dropped=pack.meta_chunks_dropped, meta_documents_skipped=pack.meta_documents_skipped,
                   single_meta_chunk_segments=pack.single_meta_chunk_segments,
                   negatives=mining.chosen,
                   filtered=dict(sorted(mining.filtered.items())), short_of_k=mining.short_of_k,
                   similarity_hist=mining.similarity_hist.tolist(),
                   similarity_sum=round(mining.similarity_sum, 6))

    @classmethod
    def from_dict(cls, value: dict) -> "ShardReport":
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(hist: np.ndarray, q: float) -> float | None:
    """Upper edge of the histogram bin holding quantile q."""
    total = hist.sum()
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(hist), q * total))
    return round(float(SIMILARITY_BINS[index + 1]), 2)


@dataclass(frozen=True)
class RunFigures:
    """What the summary reports beside the collections and shards; None where it does not apply."""

    recall_at_10: float | None  # of the index against exact search (`index_recall`)
    corpus_near_duplicates: int | None  # documents marked (`near_duplicates`)
    embedder_window: int | None


def summarize(config, tokenizer, meta, corpus, reports: list[ShardReport], figures: RunFigures) -> dict:
    roles: Counter = Counter()
    filtered: Counter = Counter()
    joiners: Counter = Counter()
    for report in reports:
        roles.update(report.tokens_by_role)
        filtered.update(report.filtered)
        joiners.update(report.joiner_tokens)
    hist = np.sum([r.similarity_hist for r in reports], axis=0) if reports else np.zeros(40)
    negatives = sum(r.negatives for r in reports)
    collections = {"meta": meta} if corpus is meta else {"meta": meta, "corpus": corpus}
    return {
        "strategy": config.mining.strategy.value,
        "seq_len": config.output.seq_len,
        "documents": {
            name: {**c.read.to_dict(), "chunks": c.chunks,
                   "chunks_over_embedder_window": c.build.chunks_over_window}
            for name, c in collections.items()
        },
        "embedder": {"name": config.embedder, "window": figures.embedder_window},
        "corpus_near_duplicate_documents": figures.corpus_near_duplicates,
        "sequences": sum(r.sequences for r in reports),
        "segments": sum(r.segments for r in reports),
        "meta_documents_used": sum(r.documents_used for r in reports),
        "meta_documents_skipped": sum(r.meta_documents_skipped for r in reports),
        "single_meta_chunk_segments": sum(r.single_meta_chunk_segments for r in reports),
        "tokens_by_role": dict(sorted(roles.items())),
        "joiner_tokens": dict(sorted(joiners.items())),
        "truncated_tokens": sum(r.truncated_tokens for r in reports),
        "meta_tokens": {"offered": sum(r.meta_tokens_offered for r in reports),
                        "placed": sum(r.meta_tokens_placed for r in reports),
                        "chunks_dropped": sum(r.meta_chunks_dropped for r in reports)},
        "negatives": {
            "chosen": negatives,
            "filtered": dict(sorted(filtered.items())),
            "meta_chunks_short_of_k": sum(r.short_of_k for r in reports),
            "similarity_mean": round(sum(r.similarity_sum for r in reports) / negatives, 4)
            if negatives else None,
            "similarity_p10_p50_p90": [_quantile(hist, q) for q in (0.1, 0.5, 0.9)],
            "similarity_histogram": {f"{SIMILARITY_BINS[i]:.2f}": int(n)
                                     for i, n in enumerate(hist) if n},
        },
        "index": {"kind": config.index.kind if config.mining.strategy.searches_index else None,
                  "recall_at_10": None if figures.recall_at_10 is None else round(figures.recall_at_10, 4)},
        "tokenizer": {"name": config.tokenizer, "vocab_size": tokenizer.vocab_size},
    }


def render_summary(summary: dict) -> str:
    lines = [f"# NExtLong synthesis summary ({summary['strategy']}, seq_len {summary['seq_len']})",
             ""]
    for name, c in summary["documents"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) or "none"
        lines.append(f"- {name} documents: {c['accepted']} read, skipped: {skipped}; "
                     f"{c['chunks']} chunks")
        if c["chunks_over_embedder_window"]:
            lines.append(f"  - WARNING: {c['chunks_over_embedder_window']} {name} chunks are longer than the "
                         f"embedder's window ({summary['embedder']['window']} tokens): retrieval sees only their "
                         "start. Raise --embed-max-tokens where the model allows, or chunk smaller")
    total = sum(summary["tokens_by_role"].values()) or 1
    roles = ", ".join(f"{k} {v} ({100 * v / total:.1f}%)"
                      for k, v in summary["tokens_by_role"].items())
    meta = summary["meta_tokens"]
    dropped = meta["offered"] - meta["placed"]
    joiners = ", ".join(f"{k} {v}" for k, v in summary["joiner_tokens"].items()) or "none"
    lines += [
        f"- sequences: {summary['sequences']} ({summary['segments']} segments from "
        f"{summary['meta_documents_used']} documents; {summary['meta_documents_skipped']} skipped as shorter than "
        f"--min-meta-chunks)",
        f"- tokens by role: {roles}; joiner tokens among them: {joiners}",
        f"- meta tokens kept: {meta['placed']} of {meta['offered']} "
        f"({100 * meta['placed'] / max(meta['offered'], 1):.1f}%); dropped where segments are cut: {dropped}, "
        f"{meta['chunks_dropped']} meta-chunks of them entirely",
        f"- chunk tokens cut at segment ends and lost (meta and negative): {summary['truncated_tokens']}",
    ]
    if Strategy(summary["strategy"]).extends:
        lines.append(f"- segments holding a single meta-chunk, nothing to bridge (a one-chunk meta-document, or no "
                     f"room for two): {summary['single_meta_chunk_segments']} of {summary['segments']}")
    neg = summary["negatives"]
    if neg["chosen"]:
        filtered = ", ".join(f"{k} {v}" for k, v in neg["filtered"].items()) or "none"
        lines += [
            f"- negatives: {neg['chosen']} (filtered out: {filtered}; meta-chunks short of their quota: "
            f"{neg['meta_chunks_short_of_k']})",
            f"- negative cosine similarity: mean {neg['similarity_mean']}, "
            f"p10/p50/p90 {neg['similarity_p10_p50_p90']}",
        ]
    if summary["corpus_near_duplicate_documents"] is not None:
        duplicates = summary["corpus_near_duplicate_documents"]
        lines.append(f"- corpus near-duplicate documents (never negatives): {duplicates}")
    if summary["index"]["kind"]:
        lines.append(f"- index {summary['index']['kind']}: recall@10 vs exact search "
                     f"{summary['index']['recall_at_10']}")
    return "\n".join(lines) + "\n"
