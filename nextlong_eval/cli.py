"""`nextlong-eval`: long-context evaluation of a trained model where it trains (the run's mesh and kernels)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

from nextlong_eval.probes import TASKS

DESCRIPTION = """\
probes: RULER's 13 long-context tasks (needles in haystacks, variable tracking, common and frequent
words, document QA) built offline in the model's tokens, each prompt fitted to the length less its
task's generation budget, scored as RULER scores them (generate: greedy decoding, string match; the
default) and/or by one teacher-forced forward pass (forced: exact match and log-likelihood, cheap
curves during training). Writes OUT/results.json, OUT/table.md and OUT/heatmap-SCORING.png.
"""
EPILOG = """\
examples:
  nextlong-eval probes --ckpt runs/tiny/checkpoints/20 --config configs/train/tiny-cpu.yaml --lengths 1024 \\
      --tasks niah_single_1,niah_multikey_2,vt --scoring forced --out out/eval
  nextlong-eval probes --hf out/demo-hf --config configs/train/tiny-cpu.yaml --lengths 2048,4096,8192 --samples 20 \\
      --squad dev-v2.0.json --hotpotqa hotpot_dev_distractor_v1.json --out out/eval-hf
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


def _listed(known: tuple[str, ...], what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        unknown = [t for t in names if t not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
        return names
    return parse


def _model_source(p: argparse.ArgumentParser) -> None:
    """--ckpt or --hf, and the training --config the model runs with."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", type=Path, metavar="RUN/checkpoints/STEP", help="an orbax checkpoint step")
    model.add_argument("--hf", type=Path, metavar="DIR", help="a local Hugging Face Llama directory")
    p.add_argument("--config", type=Path, required=True,
                   help="training YAML whose mesh, attention kernel and dtypes the evaluation runs with (the "
                        "architecture comes from the model)")


def _model_arguments(p: argparse.ArgumentParser, out_dir: bool = True) -> None:
    _model_source(p)
    if out_dir:
        p.add_argument("--out", type=Path, required=True, help="directory for the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of --config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextlong-eval", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    probes = sub.add_parser("probes", help="RULER's long-context tasks at chosen lengths",
                            description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(probes)
    probes.add_argument("--lengths", type=_numbers(int), default=(4096,),
                        help="probe lengths in tokens: a prompt and its task's generation budget fit in one "
                             "(default 4096)")
    probes.add_argument("--samples", type=int, default=10,
                        help="probes per task and length, needles at seeded random depths (default 10; RULER: 500)")
    probes.add_argument("--tasks", type=_listed(TASKS, "task(s)"),
                        help=f"comma-separated, of {','.join(TASKS)} (default: all, qa_1 and qa_2 when --squad "
                             "and --hotpotqa name their files)")
    probes.add_argument("--scoring", type=_listed(("generate", "forced"), "scoring(s)"), default=("generate",),
                        help="comma-separated: generate (RULER's: greedy decoding of the task's budget, "
                             "string_match_all / _part; the default) and/or forced (teacher-forced exact match "
                             "and log-likelihood of the gold continuation, one forward pass)")
    probes.add_argument("--corpus", default="sample:pydocs",
                        help="texts for the essay haystacks of niah_single_2/3, niah_multikey_1, niah_multivalue "
                             "and niah_multiquery (RULER's: Paul Graham's essays; default: the bundled Python docs)")
    probes.add_argument("--squad", metavar="FILE", help="SQuAD 2.0 dev JSON (dev-v2.0.json), for qa_1")
    probes.add_argument("--hotpotqa", metavar="FILE",
                        help="HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json), for qa_2")
    probes.add_argument("--tokenizer", help="'llama3' (bundled), a tokenizer.json or an HF tokenizer directory "
                                            "(default: --hf's directory when it holds one, else llama3)")
    probes.add_argument("--save-probes", type=Path, metavar="FILE", help="also write the probes as JSONL")
    probes.add_argument("--batch-size", type=int,
                        help="probes decoded together by --scoring generate, a multiple of the mesh's batch shards "
                             "(default: one per shard; more where memory allows: a decode step costs little more)")
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
    generate = sub.add_parser(
        "generate", help="complete prompts with the model (KV-cache decoding on the training mesh)",
        description="Greedy or sampled completions: prefill runs the training forward on the config's mesh and "
                    "attention kernel (a long prompt sharded over mesh.sequence), then one token per step from a "
                    "KV cache that stays sharded. Stops at the model's end-of-sequence ids, a --stop string or "
                    "--max-new-tokens. With --prompt, prints the completion; with --prompts, writes one JSON line "
                    "per prompt (to --out, or stdout).",
        epilog="examples:\n  nextlong-eval generate --hf SMOLLM2_DIR --config configs/train/tiny-cpu.yaml --chat-template "
               "--prompt 'What is the capital of France?'\n  nextlong-eval generate --ckpt runs/8b-128k/checkpoints/1000 "
               "--config configs/train/llama3-8b-128k.yaml --prompts prompts.jsonl --max-new-tokens 256 --out out.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(generate, out_dir=False)
    text = generate.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="one prompt")
    text.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                      help='one JSON object per line with a "prompt" (text) or "messages" (chat) field')
    generate.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write the completions here as JSON lines")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="token budget per prompt (default 128)")
    generate.add_argument("--chat-template", action="store_true",
                          help="wrap each prompt as a user turn in the tokenizer's chat template")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    generate.add_argument("--batch-size", type=int, help="prompts per step (default: one per batch shard of the mesh)")
    generate.add_argument("--tokenizer", help="a tokenizer.json or HF tokenizer directory (default: the model's)")
    harness = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks (RULER, LongBench, ...) with this model on the training mesh",
        description="Runs `lm-eval run --model nextlong` (nextlong_eval/harness.py): every option after the "
                    "model's own is lm-eval's (--tasks, --limit, --metadata, --output_path, --log_samples, "
                    "--apply_chat_template, --gen_kwargs, --batch_size, ...) and goes to it unchanged, so results "
                    "and samples files are lm-eval's. RULER's tasks size their prompts with the model's tokenizer "
                    "(passed on as the `tokenizer` model argument) at --metadata '{\"max_seq_lengths\":[...]}'; its "
                    "essay and QA tasks download their data where a network exists, the others (niah_single_1, "
                    "niah_multikey_2/3, ruler_vt, ruler_cwe, ruler_fwe) need none. Needs the harness extra: "
                    "pip install 'nextlong-jax[harness]'.",
        epilog="example:\n  nextlong-eval harness --ckpt runs/8b-128k/checkpoints/1000 --config "
               "configs/train/llama3-8b-128k.yaml --tasks ruler --metadata '{\"max_seq_lengths\":[131072]}' "
               "--output_path out/ruler-128k --log_samples",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    _model_source(harness)
    harness.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                         help="dotted override of --config (repeatable)")
    harness.add_argument("--tokenizer", help="HF tokenizer directory (default: the model's)")
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
    """--tokenizer; else the model's own (an HF directory's, or the one a run started from a model keeps
    beside its checkpoints); else the bundled Llama 3 one."""
    from nextlong_jax.convert import model_tokenizer

    if args.tokenizer:
        return args.tokenizer
    own = model_tokenizer(args.hf, args.ckpt)
    return str(own) if own is not None else "llama3"


def run_probes(args: argparse.Namespace) -> str:
    """Writes the probes' results; returns what to print."""
    from nextlong_contract.tokenizer import load_tokenizer
    from tqdm.auto import tqdm

    from nextlong_eval.probes import ESSAY_TASKS, QA_DATASETS, SYNTHETIC, ProbeFactory, ProbeSpec, corpus_texts
    from nextlong_eval.report import METRIC, save_probes, summary, write_results
    from nextlong_eval.runner import Evaluator
    from nextlong_eval.scoring import generate_verdicts, verdict
    from nextlong_jax.train_config import load_config

    config = load_config(args.config, ["data.source=unused", *args.overrides])
    tokenizer = load_tokenizer(_tokenizer_spec(args))
    files = {"qa_1": args.squad, "qa_2": args.hotpotqa}
    tasks = args.tasks or SYNTHETIC + tuple(t for t in QA_DATASETS if files[t])
    spec = ProbeSpec(tasks=tasks, lengths=args.lengths, samples=args.samples, seed=args.seed, squad=args.squad,
                     hotpotqa=args.hotpotqa)
    essays = corpus_texts(args.corpus) if set(tasks) & set(ESSAY_TASKS) else []
    probes = ProbeFactory(spec, tokenizer, essays).all()  # too short a length, no QA file: ValueError
    if args.save_probes:
        save_probes(args.save_probes, probes)
    evaluator = Evaluator.load(config, ckpt=args.ckpt, hf=args.hf)
    eos = evaluator.model.config.eos_token_id
    stops = sorted({*(eos if isinstance(eos, tuple) else (eos,)), tokenizer.eos_id} - {None})
    results, seconds = {}, {}
    for scoring in args.scoring:
        started = time.perf_counter()
        if scoring == "generate":
            generate = partial(evaluator.generate, batch_size=args.batch_size)
            results[scoring] = generate_verdicts(probes, generate, tokenizer, stops)
        else:
            bar = tqdm(total=len(probes), desc="probes", unit="probe", dynamic_ncols=True)
            results[scoring] = [verdict(p, *s) for p, s in zip(probes, evaluator.score(probes, progress=bar))]
        seconds[scoring] = round(time.perf_counter() - started, 2)
    about = {"model": str(args.ckpt or args.hf), "config": str(args.config), "overrides": args.overrides,
             "tokenizer": tokenizer.name, "spec": {**spec.__dict__, "corpus": args.corpus if essays else None},
             "mesh": dict(evaluator.mesh.shape), "attention_backend": evaluator.model.runtime.attention_backend,
             "seconds": seconds, "prompt_tokens": sum(len(p.prompt_ids) for p in probes)}
    written = write_results(args.out, results, about)
    means = {scoring: summary(verdicts, METRIC[scoring])["mean"] for scoring, verdicts in results.items()}
    return ((args.out / "table.md").read_text() + f"\n{len(probes)} probes ("
            + ", ".join(f"{scoring} in {s} s" for scoring, s in seconds.items())
            + f") on mesh {about['mesh']} with {about['attention_backend']} attention; written: "
            + ", ".join(map(str, written)) + "\n" + json.dumps(means))


def run_dependency(args: argparse.Namespace) -> str:
    """Writes the dependency measurement; returns what to print."""
    from synth.tfrecord import read_dataset

    from nextlong_jax.convert import model_tokenizer
    from nextlong_eval.dependency import measure, write
    from nextlong_eval.runner import Evaluator, stored_model
    from nextlong_contract.reader import read_output
    from nextlong_jax.train_config import load_config
    from nextlong_jax.vocabulary import check_vocabulary

    config = load_config(args.config, ["data.source=unused", *args.overrides])
    output = read_output(args.data)  # checked before the model loads: a misfit fails in seconds
    check_vocabulary(output.manifest.extra.get("tokenizer"), output.manifest_path,
                     stored_model(args.ckpt, args.hf).vocab_size, model_tokenizer(args.hf, args.ckpt))
    examples = list(read_dataset(args.data, with_provenance=True).take(args.max_sequences).as_numpy_iterator())
    evaluator = Evaluator.load(config, ckpt=args.ckpt, hf=args.hf)
    started = time.perf_counter()
    result = measure(evaluator, examples, args.targets_per_segment, args.seed)
    about = {"model": str(args.ckpt or args.hf), "data": str(args.data), "sequences": len(examples),
             "mesh": dict(evaluator.mesh.shape), "seconds": round(time.perf_counter() - started, 2)}
    written = write(args.out, result, about)
    return ((args.out / "dependency.md").read_text() + f"\n{len(examples)} sequences in {about['seconds']} s on "
            f"mesh {about['mesh']}; written: " + ", ".join(map(str, written)))


def _prompts(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    rows = []
    for n, line in enumerate(args.prompts.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.prompts}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt", row.get("messages")), (str, list)):
            raise ValueError(f'{args.prompts}:{n}: needs a "prompt" string or a "messages" list')
        rows.append(row)
    if not rows:
        raise ValueError(f"{args.prompts} holds no prompts")
    return rows


def _prompt_ids(rows: list[dict], tokenizer, chat_template: bool) -> list[list[int]]:
    """Token ids as transformers would give them: a chat template rendered by the tokenizer's own
    (`apply_chat_template`), plain text with the tokenizer's own special tokens (a BOS for Llama 3)."""
    if not chat_template and not any("messages" in r for r in rows):
        return [tokenizer.backend.encode(r["prompt"], add_special_tokens=True).ids for r in rows]
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(tokenizer.name, local_files_only=True)
    if chat.chat_template is None:
        raise ValueError(f"the tokenizer {tokenizer.name} has no chat template: leave out --chat-template and "
                         '"messages"')
    return [chat.apply_chat_template(r.get("messages") or [{"role": "user", "content": r["prompt"]}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False) for r in rows]


def run_generate(args: argparse.Namespace) -> str:
    """Completes the prompts; returns the completion (--prompt) or a summary (--prompts)."""
    from nextlong_contract.tokenizer import load_tokenizer
    from tqdm.auto import tqdm

    from nextlong_jax.decode import Sampling
    from nextlong_eval.runner import Evaluator
    from nextlong_jax.train_config import load_config

    config = load_config(args.config, ["data.source=unused", *args.overrides])
    tokenizer = load_tokenizer(_tokenizer_spec(args))
    rows = _prompts(args)
    ids = _prompt_ids(rows, tokenizer, args.chat_template)
    evaluator = Evaluator.load(config, ckpt=args.ckpt, hf=args.hf)
    eos = evaluator.model.config.eos_token_id
    stop_ids = {*(eos if isinstance(eos, tuple) else (eos,)), tokenizer.eos_id} - {None}
    decoder = evaluator.decoder(tokenizer.decode, args.batch_size)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    started = time.perf_counter()
    with tqdm(total=len(ids), desc="generate", unit="prompt", dynamic_ncols=True, disable=len(ids) == 1) as bar:
        done = decoder.generate(ids, args.max_new_tokens, stop_ids=sorted(stop_ids), stop_strings=args.stop,
                                sampling=sampling, progress=bar)
    seconds = time.perf_counter() - started
    lines = [json.dumps({**row, "completion": c.text, "finish": c.finish, "new_tokens": len(c.tokens)})
             for row, c in zip(rows, done)]
    if args.out is None:
        return done[0].text if args.prompt is not None else "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    new = sum(len(c.tokens) for c in done)
    return (f"{len(done)} completions, {new} new tokens in {seconds:.1f} s ({new / seconds:.1f} tokens/s) on mesh "
            f"{dict(evaluator.mesh.shape)}; written: {args.out}")


def run_harness(args: argparse.Namespace, lm_eval_args: list[str]) -> str:
    """Runs lm-eval's own command line with this stack's model; returns where the results went."""
    try:
        import lm_eval.__main__
    except ImportError as e:
        raise ValueError(f"nextlong-eval harness needs lm-eval ({e}): pip install 'nextlong-jax[harness]'") from None
    import jax

    from nextlong_jax.convert import model_tokenizer
    from nextlong_eval.harness import MODEL_NAME
    from nextlong_jax.train_setup import start_runtime

    from nextlong_eval.runner import stored_model

    stored_model(args.ckpt, args.hf)  # not a Llama, no checkpoint: one line before lm-eval starts
    if not {"--tasks", "-t"} & set(lm_eval_args):
        raise ValueError("name the lm-eval tasks: --tasks ruler (or niah_single_1,ruler_vt,...)")
    tokenizer = args.tokenizer or model_tokenizer(args.hf, args.ckpt)
    # `pretrained` only names the model in lm-eval's output directories, as for its hf model.
    model_args = {"pretrained": args.hf or args.ckpt, "config": args.config, "hf": args.hf, "ckpt": args.ckpt,
                  "tokenizer": tokenizer,
                  "overrides": ";".join(args.overrides)}
    model_args = ",".join(f"{k}={v}" for k, v in model_args.items() if v)
    start_runtime()  # before lm-eval starts: which process this is decides who writes
    if jax.process_index() != 0:  # the same program runs everywhere; one host writes
        lm_eval_args = _without_outputs(lm_eval_args)
    argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", model_args, *lm_eval_args]
    saved, sys.argv = sys.argv, argv
    try:
        lm_eval.__main__.cli_evaluate()
    except ValueError as e:  # lm-eval checks the task names before it loads the model
        if not str(e).startswith("Tasks not found: "):
            raise
        raise ValueError(f"lm-eval knows no task {str(e).removeprefix('Tasks not found: ')}: `lm-eval ls tasks` "
                         "lists them (RULER's are niah_single_1..3, niah_multikey_1..3, niah_multivalue, "
                         "niah_multiquery, ruler_vt, ruler_cwe, ruler_fwe, ruler_qa_squad, ruler_qa_hotpot; the "
                         "group: ruler)") from None
    finally:
        sys.argv = saved
    where = lm_eval_args[lm_eval_args.index("--output_path") + 1] if "--output_path" in lm_eval_args else None
    return f"lm-eval results written under {where}" if where else "lm-eval done (no --output_path: nothing written)"


def _without_outputs(lm_eval_args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in lm_eval_args:
        if skip:
            skip = False
        elif arg in ("--output_path", "-o"):
            skip = True
        elif arg not in ("--log_samples", "-s"):
            out.append(arg)
    return out


def run_ablation(args: argparse.Namespace) -> str:
    """Synthesizes, trains and evaluates every arm of the preset; returns the report."""
    from nextlong_eval.ablation import AblationConfig, run_ablation as run

    report = run(AblationConfig.load(args.config), args.out)
    return report.read_text() + f"\nreport: {report}"


COMMANDS = {"probes": run_probes, "dependency": run_dependency, "generate": run_generate, "ablation": run_ablation}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, lm_eval_args = parser.parse_known_args(argv)
    if lm_eval_args and args.command != "harness":
        parser.error(f"unrecognized arguments: {' '.join(lm_eval_args)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nextlong_jax.convert import ConversionError
    from nextlong_jax.train_config import ConfigError
    from nextlong_jax.train_setup import TrainError

    try:
        print(run_harness(args, lm_eval_args) if args.command == "harness" else COMMANDS[args.command](args))
    except (ConfigError, TrainError, ConversionError, OSError, ValueError, RuntimeError) as e:
        print(f"nextlong-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
