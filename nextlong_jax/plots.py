"""Pictures of a training run, drawn from its `metrics.jsonl`: loss by role (all tokens as weighted,
meta-chunk tokens, negative tokens) and throughput per step. Written next to the metrics at the end of
training and by `nextlong-train plot RUN`."""

from __future__ import annotations

import json
from pathlib import Path

LOSS_PNG, THROUGHPUT_PNG = "loss.png", "throughput.png"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run directory that has trained at least one step")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def plot_run(run_dir: Path, title: str | None = None) -> list[Path]:
    """loss.png and throughput.png in `run_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    title = title or run_dir.name
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "training loss (weighted)"), ("meta_loss", "meta-chunk tokens"),
                       ("negative_loss", "negative tokens")):
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"{title}: loss by role")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / LOSS_PNG, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    steps, values = _series(rows, "tokens_per_s")
    # The first step of each invocation includes compilation: drawn, but the axis is set by the rest.
    ax.plot(steps, values, marker="." if len(steps) < 50 else None)
    if len(values) > 2:
        ax.set_ylim(0, 1.2 * max(sorted(values)[-len(values) // 10 - 1], 1))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{title}: throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / THROUGHPUT_PNG, dpi=100)
    plt.close(fig)
    return [run_dir / LOSS_PNG, run_dir / THROUGHPUT_PNG]
