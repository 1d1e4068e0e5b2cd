"""`nextlong-eval`: long-context evaluation of a trained model where it trains (the run's mesh and kernels)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nextlong_jax.eval.probes import HAYSTACKS, TASKS

DESCRIPTION = """\
probes: RULER-style long-context probes (needle in a haystack, variable tracking, common words), built
offline in the model's tokens at exactly the lengths asked for, scored by one teacher-forced forward
pass each: exact match under greedy decoding, the answer's log-likelihood, string_match_all.
Writes OUT/results.json, OUT/table.md and OUT/heatmap-TASK.png.
"""
EPILOG = """\
examples:
  nextlong-eval probes --ckpt runs/tiny/checkpoints/20 --config configs/train/tiny-cpu.yaml --lengths 512,1024 --out out/eval
  nextlong-eval probes --hf out/demo-hf --config configs/train/tiny-cpu.yaml --lengths 2048,4096,8192 --out out/eval-hf
  nextlong-eval probes --ckpt runs/8b-128k/checkpoints/1000 --config configs/train/llama3-8b-128k.yaml \\
      --lengths 8192,16384,32768,65536,131072 --out out/eval-128k      # on the slice the preset names
"""


def _numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return parse


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return tasks


def _model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", type=Path, metavar="RUN/checkpoints/STEP", help="an orbax checkpoint step")
    model.add_argument("--hf", type=Path, metavar="DIR", help="a local Hugging Face Llama directory")
    p.add_argument("--config", type=Path, required=True,
                   help="training YAML whose mesh, attention kernel and dtypes the evaluation runs with (the "
                        "architecture comes from the model)")
    p.add_argument("--out", type=Path, required=True, help="directory for the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of --config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextlong-eval", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    probes = sub.add_parser("probes", help="long-context probes at chosen lengths and needle depths",
                            description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(probes)
    probes.add_argument("--lengths", type=_numbers(int), default=(4096,),
                        help="probe lengths in tokens, prompt + answer exactly (default 4096)")
    probes.add_argument("--depths", type=_numbers(float), default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help="needle depths in the haystack, 0..1 (default 0,0.25,0.5,0.75,1)")
    probes.add_argument("--tasks", type=_tasks, default=TASKS, help=f"comma-separated (default all: {','.join(TASKS)})")
    probes.add_argument("--haystack", choices=HAYSTACKS, default="noise",
                        help="noise (RULER's repeated sentences, default) or essay (sentences of --corpus)")
    probes.add_argument("--corpus", default="sample:pydocs",
                        help="texts for essay haystacks and common-word lists (default: the bundled Python docs)")
    probes.add_argument("--uuid-values", action="store_true", help="needle values as UUIDs, not 7-digit numbers")
    probes.add_argument("--tokenizer", help="'llama3' (bundled), a tokenizer.json or an HF tokenizer directory "
                                            "(default: --hf's directory when it holds one, else llama3)")
    probes.add_argument("--save-probes", type=Path, metavar="FILE", help="also write the probes as JSONL")
    dependency = sub.add_parser(
        "dependency", help="does the model use distant related text? loss on meta-chunks with and without it",
        description="On sequences nextlong-synth made from held-out meta-documents (--data), the loss on each "
                    "segment's last meta-chunks with the real context, and with the earlier meta-chunks replaced by "
                    "other documents' text of the same token lengths (same layout and positions), by distance "
                    "between the chunks; and the loss by position of meta and negative tokens. Writes "
                    "OUT/dependency.json, .md and .png.")
    _model_arguments(dependency)
    dependency.add_argument("--data", required=True, help="a nextlong-synth output directory (or its manifest)")
    dependency.add_argument("--max-sequences", type=int, default=64, help="sequences read from --data (default 64)")
    dependency.add_argument("--targets-per-segment", type=int, default=2,
                            help="meta-chunks measured per segment, the last ones (default 2)")
    ablation = sub.add_parser(
        "ablation", help="NExtLong data against its baselines: synthesize, train and evaluate every arm",
        description="From one preset (configs/eval/ablation-*.yaml): the same meta-documents and corpus at the same "
                    "token budget synthesized as each arm (nextlong, random-negatives, plain-concat, knn-concat), the "
                    "same model trained from the same seed on each, then probes and the dependency probe on "
                    "held-out meta-documents for each. Writes OUT/report.md with one table and the plots; rerun to "
                    "resume.")
    ablation.add_argument("--config", type=Path, required=True, help="an ablation preset, e.g. configs/eval/ablation-cpu.yaml")
    ablation.add_argument("--out", type=Path, required=True, help="where data, runs, evaluations and report.md go")
    return p


def _tokenizer_spec(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.hf is not None and ((args.hf / "tokenizer.json").is_file() or (args.hf / "tokenizer_config.json").is_file()):
        return str(args.hf)
    return "llama3"


def run_probes(args: argparse.Namespace) -> str:
    """Writes the probes' results; returns what to print."""
    from synth.tokenizer import load_tokenizer
    from tqdm.auto import tqdm

    from nextlong_jax.eval.probes import ProbeFactory, ProbeSpec, corpus_texts
    from nextlong_jax.eval.report import save_probes, write_results
    from nextlong_jax.eval.runner import Evaluator
    from nextlong_jax.eval.scoring import verdict
    from nextlong_jax.train_config import load_config

    config = load_config(args.config, ["data.source=unused", *args.overrides])
    tokenizer = load_tokenizer(_tokenizer_spec(args))
    spec = ProbeSpec(tasks=args.tasks, lengths=args.lengths, depths=args.depths, haystack=args.haystack,
                     uuid_values=args.uuid_values, seed=args.seed)
    probes = ProbeFactory(spec, tokenizer, corpus_texts(args.corpus)).all()  # too short a length: ValueError
    if args.save_probes:
        save_probes(args.save_probes, probes, tokenizer.decode)
    evaluator = Evaluator.load(config, ckpt=args.ckpt, hf=args.hf)
    started = time.perf_counter()
    scores = evaluator.score(probes, progress=tqdm(total=len(probes), desc="probes", unit="probe", dynamic_ncols=True))
    seconds = time.perf_counter() - started
    verdicts = [verdict(p, lp, rank) for p, (lp, rank) in zip(probes, scores)]
    about = {"model": str(args.ckpt or args.hf), "config": str(args.config), "overrides": args.overrides,
             "tokenizer": tokenizer.name, "spec": {**spec.__dict__, "corpus": args.corpus},
             "mesh": dict(evaluator.mesh.shape), "attention_backend": evaluator.model.config.attention_backend,
             "seconds": round(seconds, 2), "tokens_per_s": round(sum(p.length for p in probes) / seconds, 1)}
    written = write_results(args.out, verdicts, about)
    return ((args.out / "table.md").read_text() + f"\n{len(verdicts)} probes in {about['seconds']} s "
            f"({about['tokens_per_s']:.0f} tokens/s) on mesh {about['mesh']} with {about['attention_backend']} "
            "attention; written: " + ", ".join(map(str, written)) + "\n"
            + json.dumps({"exact": sum(v.exact for v in verdicts) / len(verdicts)}))


def run_dependency(args: argparse.Namespace) -> str:
    """Writes the dependency measurement; returns what to print."""
    from synth.tfrecord import read_dataset

    from nextlong_jax.eval.dependency import measure, write
    from nextlong_jax.eval.runner import Evaluator
    from nextlong_jax.train_config import load_config

    config = load_config(args.config, ["data.source=unused", *args.overrides])
    examples = list(read_dataset(args.data, with_provenance=True).take(args.max_sequences).as_numpy_iterator())
    evaluator = Evaluator.load(config, ckpt=args.ckpt, hf=args.hf)
    started = time.perf_counter()
    result = measure(evaluator, examples, args.targets_per_segment, args.seed)
    about = {"model": str(args.ckpt or args.hf), "data": str(args.data), "sequences": len(examples),
             "mesh": dict(evaluator.mesh.shape), "seconds": round(time.perf_counter() - started, 2)}
    written = write(args.out, result, about)
    return ((args.out / "dependency.md").read_text() + f"\n{len(examples)} sequences in {about['seconds']} s on "
            f"mesh {about['mesh']}; written: " + ", ".join(map(str, written)))


def run_ablation(args: argparse.Namespace) -> str:
    """Synthesizes, trains and evaluates every arm of the preset; returns the report."""
    from nextlong_jax.eval.ablation import AblationConfig, run_ablation as run

    report = run(AblationConfig.load(args.config), args.out)
    return report.read_text() + f"\nreport: {report}"


COMMANDS = {"probes": run_probes, "dependency": run_dependency, "ablation": run_ablation}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nextlong_jax.convert import ConversionError
    from nextlong_jax.train_config import ConfigError
    from nextlong_jax.train_setup import TrainError

    try:
        print(COMMANDS[args.command](args))
    except (ConfigError, TrainError, ConversionError, OSError, ValueError, RuntimeError) as e:
        print(f"nextlong-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
