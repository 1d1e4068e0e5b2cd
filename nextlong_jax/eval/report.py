"""What `nextlong-eval probes` writes: results.json, a markdown table task x length, a heatmap per task
(needle depth x length), and the probes themselves as JSONL for any other system to score."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from nextlong_jax.eval.probes import Probe
from nextlong_jax.eval.scoring import Verdict

RESULTS, TABLE = "results.json", "table.md"
NOTE = ("Exact match under greedy decoding, computed teacher-forced (every gold token the argmax given the gold "
        "prefix); multi-part answers in the probe's order.")


def _mean(verdicts: list[Verdict], metric: str) -> float:
    return float(np.mean([float(getattr(v, metric)) for v in verdicts]))


def table(verdicts: list[Verdict], metric: str = "exact") -> str:
    """Markdown: one row per task, one column per length, the mean of `metric` in percent."""
    lengths = sorted({v.length for v in verdicts})
    cells: dict[tuple[str, int], list[Verdict]] = defaultdict(list)
    for v in verdicts:
        cells[v.task, v.length].append(v)
    tasks = list(dict.fromkeys(v.task for v in verdicts))
    lines = [f"| task | {' | '.join(str(n) for n in lengths)} | mean |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for task in tasks:
        row = [f"{100 * _mean(cells[task, n], metric):.1f}" if cells[task, n] else "-" for n in lengths]
        mean = 100 * _mean([v for v in verdicts if v.task == task], metric)
        lines.append(f"| {task} | {' | '.join(row)} | {mean:.1f} |")
    return "\n".join(lines) + "\n"


def heatmap(verdicts: list[Verdict], task: str, path: Path, metric: str = "exact") -> None:
    """Depth (rows) x length (columns) of one task, the mean of `metric`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [v for v in verdicts if v.task == task]
    lengths, depths = sorted({v.length for v in mine}), sorted({v.depth for v in mine})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for d, depth in enumerate(depths):
        for n, length in enumerate(lengths):
            found = [v for v in mine if v.depth == depth and v.length == length]
            if found:
                grid[d, n] = 100 * _mean(found, metric)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task}: {metric} (%)")
    for (d, n), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(n, d, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(out: Path, verdicts: list[Verdict], about: dict) -> list[Path]:
    """results.json, table.md and one heatmap per task under `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps({**about, "note": NOTE, "probes": [v.to_dict() for v in verdicts]},
                                          indent=1) + "\n")
    (out / TABLE).write_text(f"# Probes: exact match (%)\n\n{NOTE}\n\n{table(verdicts)}\n"
                             f"## string_match_all (%)\n\n{table(verdicts, 'string_match_all')}")
    written = [out / RESULTS, out / TABLE]
    for task in dict.fromkeys(v.task for v in verdicts):
        written.append(out / f"heatmap-{task}.png")
        heatmap(verdicts, task, written[-1])
    return written


def save_probes(path: Path, probes: list[Probe], decode) -> None:
    """JSONL, one probe a line: what another system needs to score the same probes."""
    with open(path, "w") as f:
        for p in probes:
            f.write(json.dumps({"task": p.task, "length": p.length, "depth": p.depth,
                                "prompt_text": decode(p.prompt_ids), "answer_text": decode(p.answer_ids),
                                "prompt_ids": p.prompt_ids, "answer_ids": p.answer_ids,
                                "gold_spans": p.gold_spans, "gold_texts": p.gold_texts}) + "\n")
