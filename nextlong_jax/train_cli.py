"""`nextlong-train`: train or resume a run, or plan one for named hardware with --compile-only
(exit codes in EXIT_CODES, shown by --help)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nextlong_jax.topology import FORMS

PREEMPTED = 128 + 15  # the shell's code for "ended by SIGTERM"
EXIT_CODES = (f"exit codes: 0 trained to train.steps (--compile-only: compiled and fits); 1 a user error, or a plan "
              f"that does not compile or fit (one line on stderr); {PREEMPTED} stopped by SIGTERM after saving a "
              "checkpoint (rerun the same command to resume)")
JSONL_KEYS = ("step", "loss", "meta_loss", "negative_loss", "lr", "grad_norm", "tokens_per_s")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class RunLog:
    """metrics.jsonl, TensorBoard scalars and a console line; only process 0 writes."""

    def __init__(self, out_dir: Path, primary: bool):
        self._out_dir, self._primary = out_dir, primary
        self._jsonl = None
        self._tb = None
        self._total = 0
        self._rows: list[dict[str, Any]] = []  # this invocation's steps, for the closing summary

    def start(self, first_step: int, total_steps: int) -> None:
        self._total = total_steps
        if not self._primary:
            return
        path = self._out_dir / "metrics.jsonl"
        # A resumed run repeats the steps after its checkpoint: drop their old rows (and a row cut by a kill).
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= first_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        path.write_text("".join(kept))
        self._jsonl = path.open("a")
        import tensorflow as tf

        self._tb = tf.summary.create_file_writer(str(self._out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._primary:
            return
        row = {"step": step, **metrics}
        self._rows.append(row)
        self._jsonl.write(json.dumps({k: row[k] for k in JSONL_KEYS}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            import tensorflow as tf

            for name, value in metrics.items():
                if value is not None:
                    tf.summary.scalar(name, value)
        print(f"step {step}/{self._total}  loss {_fmt(row['loss'], '.4f')}  meta {_fmt(row['meta_loss'], '.4f')}  "
              f"neg {_fmt(row['negative_loss'], '.4f')}  lr {row['lr']:.2e}  gnorm {_fmt(row['grad_norm'], '.3f')}  "
              f"{row['tokens_per_s']:.0f} tok/s" + (f"  mfu {row['mfu']:.1%}" if row["mfu"] is not None else "")
              + (f"  skipped {row['skipped']}" if row["skipped"] else ""),
              flush=True)

    def message(self, text: str) -> None:
        if self._primary:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._tb.close()
        if self._rows:
            print(self.summary(), flush=True)
            from nextlong_jax.plots import plot_run

            written = plot_run(self._out_dir)
            print("plots: " + ", ".join(str(p) for p in written), flush=True)

    def summary(self) -> str:
        """One line over this invocation's steps; the first step's time includes compilation, so it is left out."""
        first, last = self._rows[0], self._rows[-1]
        speeds = sorted(r["tokens_per_s"] for r in self._rows[1:]) or [first["tokens_per_s"]]
        return (f"summary: steps {first['step']}-{last['step']} of {self._total}, loss {_fmt(first['loss'])} -> "
                f"{_fmt(last['loss'])} (meta {_fmt(last['meta_loss'])}, negative {_fmt(last['negative_loss'])}), "
                f"median {speeds[len(speeds) // 2]:.0f} tokens/s, {last['skipped']} skipped step(s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextlong-train", description="Train the Llama on nextlong-synth TFRecords; "
                                "rerunning with the same --out resumes from its latest checkpoint. At the end, "
                                "loss.png (loss by role) and throughput.png go next to metrics.jsonl; "
                                "`nextlong-train plot RUN` draws them for any run.",
                                epilog=EXIT_CODES)
    p.add_argument("--config", type=Path, required=True, help="YAML preset, e.g. configs/train/tiny-cpu.yaml")
    p.add_argument("--data", action="append",
                   help="shard glob, manifest.json or synthesis output dir, a local path or a URL (sets "
                        "data.source); repeat it for a mixture, drawn per sequence by --data-weights (per batch "
                        "where the outputs' documents differ in length: --doc-len slots train as shorter rows)")
    p.add_argument("--data-weights", type=float, nargs="+", metavar="W",
                   help="one weight per --data, e.g. 1 2 for a third and two thirds (default: equal)")
    p.add_argument("--out", type=Path,
                   help="run directory: checkpoints, metrics.jsonl, tensorboard (required to train)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from-hf", type=Path, help="warm start from an HF Llama directory (fresh runs only)")
    start.add_argument("--init-from", type=Path, metavar="RUN/checkpoints/STEP",
                       help="warm start from the parameters of a checkpoint step, e.g. the 64K stage's for the "
                            "512K one; the optimizer starts fresh unless --init-optimizer (fresh runs only)")
    p.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also take Adam's moments and update count from that step (bias "
                        "correction continues), as the NExtLong authors' 512K stage did; the learning-rate "
                        "schedule and the step start at 0")
    p.add_argument("--compile-only", action="store_true",
                   help="train nothing: compile the full train step for --topology on this machine (a CPU is "
                        "enough) and print per-chip memory against HBM, the attention kernels in the program and "
                        "model FLOPs per step; the last line is one JSON object")
    p.add_argument("--topology", help=f"with --compile-only (default: the config's mesh.topology): {FORMS}")
    p.add_argument("--plan-cache", type=Path, metavar="DIR",
                   help="with --compile-only: answer from a plan recorded in DIR when the step is unchanged (same "
                        "lowered program, compiler flags, devices and compiler versions, by sha256), else compile "
                        "and record it there; an unchanged 8B preset re-plans in seconds instead of minutes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")
    return p


def compile_only(args: argparse.Namespace, overrides: list[str]) -> int:
    from nextlong_jax.topology import TopologyError, parse_topology, prepare_environment
    from nextlong_jax.train_config import ConfigError, load_config

    prepare_environment()
    try:
        config = load_config(args.config, overrides)
        if not (args.topology or config.mesh.topology):
            raise ConfigError(f"{args.config} names no mesh.topology: pass --topology (e.g. v5p-64, h100-8)")
        topology = parse_topology(args.topology or config.mesh.topology)
    except (ConfigError, TopologyError) as e:
        print(f"nextlong-train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    from nextlong_jax.compile_only import plan
    from nextlong_jax.train_setup import TrainError, rows_named, slot_counts

    # Whole rows, and each program a packed source's rows take: those the config expects
    # (data.document_lens) and those of the sources given, read from their manifests.
    try:
        lengths = [*config.data.document_lens, *_manifest_document_lens(config)]
    except (ValueError, OSError) as e:
        print(f"nextlong-train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    plans = []
    for slots in slot_counts(config.data.seq_len, [None, *lengths]):
        try:
            plans.append(plan(config, topology, cache=args.plan_cache, slots=slots))
        except Exception as e:  # XLA's own failures (HBM exhausted at compile, unsupported ops) are the answer here
            reason = str(e) if isinstance(e, TrainError) else (
                f"does not compile for {topology.name}: {type(e).__name__}: {(str(e) or '-').splitlines()[0]}")
            print(json.dumps({"compiled": False, "fits": False, "topology": topology.name, "chip": topology.chip.name,
                              "slots": slots, "error": " ".join(reason.split())}), flush=True)
            print(f"nextlong-train: error: {' '.join(reason.split())}", file=sys.stderr)
            return 1
    print("\n\n".join(result.summary() for result in plans))
    # One JSON line: the whole rows' plan, the slot rows' programs under "slot_programs".
    whole, *slotted = (dataclasses.asdict(result) for result in plans)
    print(json.dumps({"compiled": True, **whole, "fits": all(result.fits for result in plans),
                      "slot_programs": slotted}), flush=True)
    for result in plans:
        if not result.fits:
            rows = "" if result.slots == 1 else f"the step for {rows_named(result.slots)} "
            print(f"nextlong-train: error: {rows}needs {result.total_gib:.1f} GiB per chip, more than the "
                  f"{result.budget_gib:.1f} GiB usable of a {result.chip}", file=sys.stderr)
    return 0 if all(result.fits for result in plans) else 1


def _manifest_document_lens(config) -> list[int]:
    """The document lengths the manifests of the given data sources declare (none without sources)."""
    if not any(config.data.sources):
        return []
    from nextlong_jax.data import find_shards

    return [shards.document_len for source in config.data.sources
            if (shards := find_shards(source, config.data.seq_len)).document_len]


def plot(argv: list[str]) -> int:
    """`nextlong-train plot RUN`: loss by role and throughput of a run, as PNGs next to its metrics."""
    p = argparse.ArgumentParser(prog="nextlong-train plot", description=plot.__doc__)
    p.add_argument("run", type=Path, help="a run directory (the --out of a training run)")
    args = p.parse_args(argv)
    from nextlong_jax.plots import plot_run

    try:
        written = plot_run(args.run)
    except (FileNotFoundError, KeyError) as e:
        print(f"nextlong-train: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={json.dumps(args.data[0] if len(args.data) == 1 else args.data)}")
    if args.data_weights:
        overrides.append(f"data.weights={json.dumps(args.data_weights)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if (args.topology or args.plan_cache) and not args.compile_only:
        parser.error("--topology and --plan-cache go with --compile-only")
    if args.init_optimizer and not args.init_from:
        print("nextlong-train: error: --init-optimizer goes with --init-from RUN/checkpoints/STEP", file=sys.stderr)
        return 1
    if args.compile_only:
        return compile_only(args, overrides)
    if args.out is None:
        parser.error("--out is required to train")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's INFO chatter is not for CLI users
    from nextlong_jax.convert import ConversionError
    from nextlong_jax.data import DataError
    from nextlong_jax.train import train
    from nextlong_jax.train_setup import TrainError, start_runtime
    from nextlong_jax.train_config import ConfigError, load_config

    log = None
    try:
        config = load_config(args.config, overrides)
        start_runtime()  # before anything asks jax about devices or processes
        import jax
        import tensorflow as tf

        # TF only reads files here; keep it off accelerators JAX owns.
        tf.config.set_visible_devices([], "GPU")
        args.out.mkdir(parents=True, exist_ok=True)
        log = RunLog(args.out, primary=jax.process_index() == 0)
        step = train(config, args.out, log, init_from_hf=args.init_from_hf, init_from=args.init_from,
                     init_optimizer=args.init_optimizer)
        if step < config.train.steps:
            return PREEMPTED  # saved and stopped early: a scheduler must not take the run as finished
        log.message(f"done at step {step}; checkpoints in {args.out / 'checkpoints'}")
        return 0
    except (ConfigError, DataError, ConversionError, TrainError, OSError) as e:
        error = e
    finally:
        if log is not None:
            log.close()
    print(f"nextlong-train: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
