"""`nextlong-synth`: the command line over the local runner (`synth.local_runner`) and the Beam runner
(`synth.beam_runner`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from synth.config import FLAGS, OPTIONS, build_config
from synth.errors import USER_ERRORS, SynthError

DESCRIPTION = """\
Turn short documents into long-context training sequences (NExtLong, arXiv 2501.12766).

Each meta-document is cut into chunks; every chunk is followed by its k most similar chunks
of a retrieval corpus (hard negatives), so the meta-document's own dependencies span many
distracting tokens. The result is written as sharded TFRecords with per-token loss weights.
Reruns with the same arguments resume where a killed run stopped.
"""

EPILOG = """\
paths: a JSONL(.gz) / Parquet file, a directory (of text files, JSONL/Parquet files, or a
TFDS dataset), a glob, or a bundled sample: sample:pydocs, sample:jargon.

example:
  nextlong-synth --meta sample:pydocs --corpus sample:jargon --out out/demo --seq-len 8192
  nextlong-synth --config configs/synth/paper-128k.yaml --meta docs.jsonl --out out/paper
  nextlong-synth index build --corpus web.parquet --cache-dir cache/ --out out/any --index faiss-ivfpq
  nextlong-synth inspect out/demo --index 0 --html page.html
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nextlong-synth", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    p.add_argument("--config", type=Path, help="YAML preset (keys as the flags); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        group = groups.get(option.group) or groups.setdefault(option.group, p.add_argument_group(option.group))
        # Unset flags stay None (store_true's False too), so they neither override a preset nor a field's default.
        group.add_argument(f"--{option.cli or option.flag}", dest=option.flag.replace("-", "_"),
                           help=option.help_text or argparse.SUPPRESS, **{**option.arguments, "default": None})
    p.add_argument("--workers", type=int, default=1,
                   help="processes making output shards with the local runner (default 1); the output is the same")
    p.add_argument("--runner", choices=("local", "beam"), default="local",
                   help="local: this machine (default); beam: an Apache Beam pipeline (needs apache-beam: pip install "
                        "nextlong-jax[beam]), the same examples as the local runner")
    p.add_argument("--beam-options", default="", metavar="OPTIONS",
                   help="Beam pipeline options, given with '=' since they start with dashes; default: DirectRunner, "
                        "2 worker processes. E.g. --beam-options='--direct_num_workers=8' or "
                        "--beam-options='--runner=FlinkRunner --flink_master=HOST:8081'")
    p.add_argument("--tfds", action="store_true",
                   help="also write TFDS metadata, so tfds.builder_from_directory(OUT) reads the shards (needs "
                        "tensorflow-datasets and uncompressed shards); may be added to a finished run")
    return p


def _flat_options(args: argparse.Namespace) -> dict:
    flat: dict = {}
    if args.config is not None:
        if not args.config.is_file():
            raise SynthError(f"config file {args.config} not found")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SynthError(f"{args.config}: expected a mapping of option: value")
        flat.update({str(k).replace("_", "-"): v for k, v in loaded.items()})
    for key in FLAGS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            flat[key] = value
    return flat


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["index", "build"]:
        return _index_build(argv[2:])
    if argv[:1] == ["inspect"]:
        return _inspect(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = build_config(_flat_options(args))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
        if args.workers < 1:
            raise SynthError("--workers must be at least 1")
        if args.tfds and config.output.out_url:
            raise SynthError("--tfds checks the shards it describes on the local disk: give a local --out")
        # Heavy imports (TensorFlow, torch, Beam) only when running.
        if args.runner == "beam":
            summary = _beam_runner().run_beam(config, args.beam_options)
        else:
            from synth.local_runner import run

            summary = run(config, workers=args.workers)
        if args.tfds:
            from synth.tfds_metadata import write_tfds_metadata

            write_tfds_metadata(config.output.out)
    except USER_ERRORS as exc:
        print(f"nextlong-synth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nextlong-synth: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    from synth.report import render_summary

    print()
    print(render_summary(summary), end="")
    timing = summary["timing"]
    print(f"- time: {timing['seconds']}s (chunking {timing['chunk_seconds']}s, "
          f"embedding {timing['embed_seconds']}s)")
    print(f"- output: {config.output.out_url or config.output.out}/manifest.json, summary.md"
          + (", TFDS metadata" if args.tfds else ""))
    return 0


def _beam_runner():
    try:
        from synth import beam_runner
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("apache_beam"):
            raise
        raise SynthError("--runner beam needs Apache Beam: pip install 'nextlong-jax[beam]'") from None
    return beam_runner


def _index_build(argv: list[str]) -> int:
    """`nextlong-synth index build [options]`: the index step alone, for many runs to reuse."""
    parser = _parser()
    parser.prog = "nextlong-synth index build"
    parser.description = ("Chunk, embed and index the retrieval corpus (--corpus, else --meta) into the cache "
                          "(--cache-dir, else OUT/.cache), where synthesis runs with the same corpus, chunking, "
                          "embedder and index settings reuse it.")
    args = parser.parse_args(argv)
    try:
        flat = _flat_options(args)
        if flat.get("meta") is None and flat.get("corpus") is not None:
            flat["meta"] = flat["corpus"]  # only the corpus is read here
        config = build_config(flat)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from synth.local_runner import build_corpus_index

        report = build_corpus_index(config)
    except USER_ERRORS as exc:
        print(f"nextlong-synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"- index {report['kind']} ({report['backend']}): {report['vectors']} vectors in {report['seconds']}s, "
          f"{report['mib_per_million_vectors']} MiB per million vectors, recall@10 vs exact search "
          f"{report['recall_at_10']}")
    print(f"- at {report['index_dir']}")
    return 0


def _inspect(argv: list[str]) -> int:
    """`nextlong-synth inspect OUT --index N [--html PAGE]`: one sequence of a finished output, piece by piece."""
    parser = argparse.ArgumentParser(
        prog="nextlong-synth inspect",
        description="Show one synthesized sequence: its meta-chunks and hard negatives by role and segment, each "
                    "negative with its source chunk and cosine to its meta-chunk, and loss weights other than 1.")
    parser.add_argument("out", type=Path, metavar="OUT", help="a synthesis output directory")
    parser.add_argument("--index", type=int, required=True, metavar="N",
                        help="which sequence, counted over the whole output in the manifest's shard order")
    parser.add_argument("--html", type=Path, metavar="PAGE",
                        help="write a self-contained HTML page here instead of printing a text view")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from synth.inspect import inspect, render_html, render_text

    try:
        view = inspect(args.out, args.index)
    except USER_ERRORS as exc:
        print(f"nextlong-synth: error: {exc}", file=sys.stderr)
        return 2
    if args.html is None:
        print(render_text(view), end="")
    else:
        args.html.write_text(render_html(view), encoding="utf-8")
        print(f"- sequence {view.index} of {view.total}: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
