"""What `nextlong-eval probes` writes: results.json (each scoring's means by task and length, the mean
of the task means, every probe's verdict), table.md (task x length per scoring), heatmap-SCORING.png
(needle depth x length, a panel per task that has a depth), and the probes themselves as JSONL for
any other system to score."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from nextlong_eval.probes import Probe

RESULTS, TABLE = "results.json", "table.md"
# The metric each scoring is summarized by, in percent, and what it means.
METRIC = {"generate": "score", "forced": "exact"}
NOTES = {
    "generate": "RULER's score: greedy decoding of the task's tokens_to_generate, RULER's post-processing, "
                "string_match_all (string_match_part for qa_1 and qa_2).",
    "forced": "Exact match under greedy decoding, computed teacher-forced (every token of the gold continuation "
              "the argmax given those before it); multi-part answers in the probe's order.",
}
DEPTH_BINS = 5


def summary(verdicts: list, metric: str) -> dict:
    """Percent means of `metric`: by task and length, by task, by length (the mean of the task means)
    and overall (the mean of the task means: every task weighs the same, whatever its sample count)."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for v in verdicts:
        cells[v.task][v.length].append(float(getattr(v, metric)))
    tasks = {task: {length: 100 * float(np.mean(values)) for length, values in sorted(by_length.items())}
             for task, by_length in cells.items()}
    task_means = {task: 100 * float(np.mean([x for values in by_length.values() for x in values]))
                  for task, by_length in cells.items()}
    lengths = sorted({length for by_length in tasks.values() for length in by_length})
    return {"metric": metric,
            "tasks": {task: {**{str(n): round(m, 2) for n, m in by_length.items()}, "mean": round(task_means[task], 2)}
                      for task, by_length in tasks.items()},
            "lengths": {str(n): round(float(np.mean([t[n] for t in tasks.values() if n in t])), 2) for n in lengths},
            "mean": round(float(np.mean(list(task_means.values()))), 2)}


def table(verdicts: list, metric: str) -> str:
    """Markdown: one row per task, one column per length and the task's mean; a last row of the task means."""
    s = summary(verdicts, metric)
    lengths = list(s["lengths"])
    lines = [f"| task | {' | '.join(lengths)} | mean |", "|---|" + "---:|" * (len(lengths) + 1)]
    for task, row in s["tasks"].items():
        values = " | ".join(f"{row[n]:.1f}" if n in row else "-" for n in lengths)
        lines.append(f"| {task} | {values} | {row['mean']:.1f} |")
    means = " | ".join(f"{s['lengths'][n]:.1f}" for n in lengths)
    lines.append(f"| **mean of tasks** | {means} | **{s['mean']:.1f}** |")
    return "\n".join(lines) + "\n"


def heatmap(verdicts: list, metric: str, path: Path, title: str) -> bool:
    """Needle depth (rows, in fifths) x length (columns), the mean of `metric`, a panel per task with
    depths; False (nothing written) when no task has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(v.task for v in verdicts if v.depth is not None))
    if not tasks:
        return False
    lengths = sorted({v.length for v in verdicts})
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    width = max(2.4, 0.9 * len(lengths))
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(1.6 + width * columns, 0.6 + 2.4 * rows))
    for k, (ax, task) in enumerate(zip(axes.flat, tasks)):
        grid = np.full((DEPTH_BINS, len(lengths)), np.nan)
        for d in range(DEPTH_BINS):
            for n, length in enumerate(lengths):
                found = [float(getattr(v, metric)) for v in verdicts if v.task == task and v.length == length
                         and v.depth is not None and min(int(v.depth * DEPTH_BINS), DEPTH_BINS - 1) == d]
                if found:
                    grid[d, n] = 100 * np.mean(found)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(DEPTH_BINS), [f"{100 * d // DEPTH_BINS}-{100 * (d + 1) // DEPTH_BINS}%" if k % columns == 0
                                          else "" for d in range(DEPTH_BINS)])
        ax.set_title(task, fontsize=9)
        for (d, n), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(n, d, f"{value:.0f}", ha="center", va="center", fontsize=7)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(f"{title} (%) by needle depth and length", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(out: Path, results: dict[str, list], about: dict) -> list[Path]:
    """`results`: each scoring's verdicts ("generate": Generated, "forced": Verdict). Writes
    results.json, table.md and a heatmap per scoring under `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    record = {**about}
    text = ["# Probes"]
    for scoring, verdicts in results.items():
        metric = METRIC[scoring]
        record[scoring] = {"note": NOTES[scoring], **summary(verdicts, metric), "probes": [v.to_dict() for v in verdicts]}
        text += [f"## {scoring}: {metric} (%)", NOTES[scoring], table(verdicts, metric)]
        if scoring == "forced":
            text += ["### forced: string_match_all (%)", table(verdicts, "string_match_all")]
    (out / RESULTS).write_text(json.dumps(record, indent=1) + "\n")
    (out / TABLE).write_text("\n\n".join(text))
    written = [out / RESULTS, out / TABLE]
    for scoring, verdicts in results.items():
        path = out / f"heatmap-{scoring}.png"
        if heatmap(verdicts, METRIC[scoring], path, f"{scoring}: {METRIC[scoring]}"):
            written.append(path)
    return written


def save_probes(path: Path, probes: list[Probe]) -> None:
    """JSONL, one probe a line, RULER's fields (input with its answer prefix, outputs) and the ids: what
    another system needs to score the same probes."""
    with open(path, "w") as f:
        for p in probes:
            f.write(json.dumps({"task": p.task, "length": p.length, "index": p.index, "depth": p.depth,
                                "input": p.prompt, "outputs": p.outputs, "max_new_tokens": p.max_new_tokens,
                                "prompt_ids": p.prompt_ids, "answer_ids": p.answer_ids,
                                "gold_spans": p.gold_spans}) + "\n")
