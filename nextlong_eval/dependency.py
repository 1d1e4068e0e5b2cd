"""Does the model use the distant, truly related text? The paper's mechanism, measured.

On sequences synthesized from held-out meta-documents (`nextlong-synth` output), the loss on a
meta-chunk m_j is taken twice: with its real context, and with the earlier meta-chunks m_1..m_j-1
replaced by text of other meta-documents of the same token lengths. Nothing else changes (tokens
elsewhere, roles, segments, positions), so the difference, in nats per token, is what the model
draws from the related text across the negatives in between. It is reported by the distance in
tokens between m_j-1 and m_j, and beside it the loss by position of meta and negative tokens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nextlong_contract.schema import ROLE_META, ROLE_NAMES, ROLE_NEGATIVE
from nextlong_jax.vocabulary import check_token_ids

DISTANCE_EDGES = (0, 256, 1024, 4096, 16384, 65536, 262144)


@dataclass(frozen=True)
class Target:
    row: int  # the sequence
    span: tuple[int, int]  # [start, end) of m_j in the sequence
    earlier: tuple[tuple[int, int], ...]  # m_1..m_j-1, replaced in the probe's variant
    distance: int  # negatives' tokens between m_j-1 and m_j


def meta_spans(example: dict) -> list[list[tuple[int, int]]]:
    """Per segment, the [start, end) of each meta-chunk (its joiner included), from `piece_starts`."""
    starts = np.asarray(example["piece_starts"], np.int64)
    if not len(starts):
        raise ValueError("these sequences carry no piece_starts: synthesize them with this version of nextlong-synth")
    segments, roles = example["segment_ids"], example["token_roles"]
    ends = np.append(starts[1:], len(segments))
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for start, end in zip(starts.tolist(), ends.tolist()):
        beyond = segments[start:end] != segments[start]
        if beyond.any():  # a piece ends where the next begins, or where its segment does (BOS, padding)
            end = start + int(np.argmax(beyond))
        if roles[start] == ROLE_META:
            spans[int(segments[start])].append((start, end))
    return [spans[s] for s in sorted(spans)]


def targets(spans: list[list[list[tuple[int, int]]]], per_segment: int) -> list[Target]:
    """From each sequence's `meta_spans`: the last `per_segment` meta-chunks of every segment that has
    an earlier one."""
    out = []
    for row, segments in enumerate(spans):
        for chunks in segments:
            for j in range(max(1, len(chunks) - per_segment), len(chunks)):
                out.append(Target(row, chunks[j], tuple(chunks[:j]), chunks[j][0] - chunks[j - 1][1]))
    return out


def replaced(ids: np.ndarray, target: Target, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ids` (the target's sequence) with its earlier meta-chunks' tokens replaced by stretches of
    `pool` (meta text of other meta-documents) of exactly their lengths."""
    ids = np.array(ids)
    for a, b in target.earlier:
        ids[a:b] = np.resize(np.roll(pool, -int(rng.integers(len(pool)))), b - a)
    return ids


@dataclass(frozen=True)
class DependencyResult:
    gap_by_distance: list[dict]  # per distance bucket: tokens range, targets, mean gap (nats/token)
    mean_gap: float
    targets: int
    loss_by_position: dict[str, list[dict]]  # role -> per position bucket: range, tokens, mean loss

    def to_dict(self) -> dict:
        return asdict(self)


def _bucket_rows(values: np.ndarray, keys: np.ndarray, edges) -> list[dict]:
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        inside = (keys >= lo) & (keys < hi)
        if inside.any():
            rows.append({"from": int(lo), "to": int(hi), "count": int(inside.sum()),
                         "mean": round(float(values[inside].mean()), 5)})
    return rows


def measure(evaluator, examples: list[dict], per_segment: int = 2, seed: int = 0) -> DependencyResult:
    """Runs the model on every sequence and on one replaced variant per target."""
    rng = np.random.default_rng(seed)
    spans = [meta_spans(e) for e in examples]
    chosen = targets(spans, per_segment)
    if not chosen:
        raise ValueError("no segment has two meta-chunks: nothing depends on distant text here")
    if len(examples) < 2:
        raise ValueError("replacing meta text needs at least two sequences (other meta-documents)")
    def stack(key: str) -> np.ndarray:
        return np.stack([np.asarray(e[key]) for e in examples]).astype(np.int32)

    ids, positions, segments = stack("input_ids"), stack("positions"), stack("segment_ids")
    check_token_ids(ids, evaluator.model.config.vocab_size, "the sequences")
    real = evaluator.token_nll(ids, positions, segments)
    meta_text = [np.concatenate([ids[r, a:b] for chunks in spans[r] for a, b in chunks]) for r in range(len(ids))]
    pools = {r: np.concatenate(meta_text[:r] + meta_text[r + 1:]) for r in {t.row for t in chosen}}
    variants = np.stack([replaced(ids[t.row], t, pools[t.row], rng) for t in chosen])
    rows = [t.row for t in chosen]
    changed = evaluator.token_nll(variants, positions[rows], segments[rows])
    gaps, distances = [], []
    for i, t in enumerate(chosen):
        a, b = t.span
        predicting = slice(a - 1, b - 1)  # position p scores token p + 1
        gaps.append(float(changed[i, predicting].mean() - real[t.row, predicting].mean()))
        distances.append(t.distance)
    gaps, distances = np.asarray(gaps), np.asarray(distances)
    by_role = {}
    roles = stack("token_roles")
    length = ids.shape[1]
    position_edges = [0] + [2 ** k for k in range(6, int(np.log2(length)) + 2)]
    for role in (ROLE_META, ROLE_NEGATIVE):
        # The loss at position p is the prediction of token p + 1, so its role is that token's.
        mask = np.zeros_like(roles, bool)
        mask[:, :-1] = (roles[:, 1:] == role) & (segments[:, 1:] == segments[:, :-1])
        by_role[ROLE_NAMES[role]] = _bucket_rows(real[mask], positions[mask] + 1, position_edges)
    return DependencyResult(_bucket_rows(gaps, distances, DISTANCE_EDGES), round(float(gaps.mean()), 5),
                            len(chosen), by_role)


def write(out: Path, result: DependencyResult, about: dict) -> list[Path]:
    """dependency.json, dependency.md and dependency.png under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "dependency.json").write_text(json.dumps({**about, **result.to_dict()}, indent=1) + "\n")
    lines = ["# Dependency on distant related text", "",
             "Loss on meta-chunk m_j with m_1..m_j-1 replaced by other documents' text, minus the loss with the real "
             "ones (nats per token; > 0: the model uses the related text across the negatives).", "",
             f"Mean gap {result.mean_gap:+.4f} over {result.targets} meta-chunks.", "",
             "| distance from m_j-1 (tokens) | meta-chunks | gap (nats/token) |", "|---|---:|---:|"]
    lines += [f"| {r['from']}-{r['to']} | {r['count']} | {r['mean']:+.4f} |" for r in result.gap_by_distance]
    (out / "dependency.md").write_text("\n".join(lines) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    centres = [np.sqrt(max(r["from"], 1) * r["to"]) for r in result.gap_by_distance]
    left.plot(centres, [r["mean"] for r in result.gap_by_distance], marker="o")
    left.axhline(0, color="grey", lw=0.8)
    left.set_xscale("log")
    left.set_xlabel("tokens between m_j-1 and m_j")
    left.set_ylabel("loss gap on m_j (nats/token)")
    left.set_title("what the related text is worth")
    for role, rows in result.loss_by_position.items():
        right.plot([np.sqrt(max(r["from"], 1) * r["to"]) for r in rows], [r["mean"] for r in rows], marker=".",
                   label=f"{role} tokens")
    right.set_xscale("log")
    right.set_xlabel("position in segment")
    right.set_ylabel("loss (nats/token)")
    right.set_title("loss by position")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "dependency.png", dpi=100)
    plt.close(fig)
    return [out / "dependency.json", out / "dependency.md", out / "dependency.png"]
