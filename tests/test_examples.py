"""Every example command a user is shown (README.md, the preset headers in configs/, `nextlong-synth
--help`) parses with the real command line and names real presets and valid settings; the synthesis
examples and the tiny model's train example run at toy size. An example cannot go stale unnoticed.

Toy size: inputs become a small JSONL file, outputs a temporary directory, and the sizes are
appended as flags (a later flag wins), so each example runs as written but small. Commands for a
Beam cluster, hardware plans (`--compile-only`, compiled for real by test_preset_plans.py) and 8B
presets are parsed and their configuration validated, not run.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from synth.cli import EPILOG, _flat_options, _parser, main as synth_main
from synth.config import build_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("nextlong-synth", "nextlong-train", "nextlong-convert", "nextlong-eval")
_COMMAND = re.compile(r"^(?:.*&&\s*)?(nextlong-(?:synth|train|convert|eval))\s+(.+)")


def _command_lines(text: str, kind: str) -> list[str]:
    """Where examples are: README's bash blocks, the comment lines of a YAML preset, a --help epilog;
    lines joined across backslash continuations."""
    if kind == "markdown":
        text = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    elif kind == "yaml":
        text = "\n".join(line.lstrip()[1:] for line in text.splitlines() if line.lstrip().startswith("#"))
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()]


def example_commands() -> list[tuple[str, str, list[str]]]:
    """(where, tool, arguments) of every example, in file order. In a preset's header, THIS is the
    preset itself; `...` stands for the arguments of the example above it and is left out."""
    from nextlong_eval.cli import EPILOG as EVAL_EPILOG

    sources = [("README.md", (ROOT / "README.md").read_text(), "markdown"), ("nextlong-synth --help", EPILOG, "text"),
               ("nextlong-eval --help", EVAL_EPILOG, "text")]
    sources += [(str(p.relative_to(ROOT)), p.read_text(), "yaml") for p in sorted((ROOT / "configs").rglob("*.yaml"))]
    found = []
    for where, text, kind in sources:
        for line in _command_lines(text, kind):
            if match := _COMMAND.match(line):
                text = match.group(2)
                if "&&" in line[:match.start(1)]:  # inside a quoted remote --command "...": ends at its quote
                    text = text.split('"')[0]
                args = [where if a == "THIS" else a for a in shlex.split(text, comments=True) if a != "..."]
                found.append((where, match.group(1), args))
    return found


EXAMPLES = example_commands()


def test_the_readme_and_presets_have_examples_of_every_command():
    assert {tool for _, tool, _ in EXAMPLES} == set(TOOLS)
    assert {where for where, _, _ in EXAMPLES} >= {"README.md", "configs/synth/paper-128k.yaml",
                                                    "configs/train/tiny-cpu.yaml", "configs/train/llama3-8b-512k.yaml"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small corpus of multi-paragraph documents, written as JSONL."""
    path = tmp_path_factory.mktemp("toy") / "docs.jsonl"
    words = "river boat current harbour anchor tide sail rope mast keel deck storm".split()
    with open(path, "w") as f:
        for d in range(16):
            paragraphs = [" ".join(words[(d + p + i) % len(words)] for i in range(30)) + "." for p in range(40)]
            f.write(json.dumps({"id": f"doc{d}", "text": "\n".join(paragraphs)}) + "\n")
    return path


def _value(args: list[str], flag: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


def _synth_toy(args: list[str], toy: Path, out: Path) -> list[str]:
    config = _value(args, "--config")
    meta = [] if _value(args, "--meta") is None and config and "meta:" in (ROOT / config).read_text() else [
        "--meta", str(toy)]
    corpus = ["--corpus", str(toy)] if _value(args, "--corpus") else []
    doc_len = ["--doc-len", "512"] if _value(args, "--doc-len") else []
    return [*args, *meta, *corpus, *doc_len, "--out", str(out / "out"), "--cache-dir", str(out / "cache"),
            "--max-meta-docs", "8", "--max-corpus-docs", "16", "--embedder", "hashing", "--index", "faiss-flat",
            "--seq-len", "2048", "--num-shards", "1", "--max-sequences", "4"]


@pytest.mark.parametrize("where,tool,args", [e for e in EXAMPLES if e[1] == "nextlong-synth"],
                         ids=lambda value: value if isinstance(value, str) else None)
def test_synth_example_runs_at_toy_size(where, tool, args, toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if args == ["--help"]:
        with pytest.raises(SystemExit) as shown:
            _parser().parse_args(args)
        assert shown.value.code == 0
        return
    if args[:1] == ["inspect"]:  # of a toy output, the page written under tmp_path
        assert synth_main(_synth_toy([], toy, tmp_path)) == 0
        page = _value(args, "--html")
        argv = ["inspect", str(tmp_path / "out"), *[str(tmp_path / "page.html") if a == page else a for a in args[2:]]]
        assert synth_main(argv) == 0, capsys.readouterr().err
        return
    argv = _synth_toy(args, toy, tmp_path)
    if args[:2] == ["index", "build"]:
        assert synth_main(argv) == 0, capsys.readouterr().err
        return
    parsed = _parser().parse_args(argv)  # an unknown flag or a bad value exits here
    build_config(_flat_options(parsed))
    if parsed.runner == "beam":
        return  # cluster options (Flink, Dataflow): parsed and validated only
    assert synth_main(argv) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["sequences"] > 0


@pytest.mark.parametrize("where,tool,args", [e for e in EXAMPLES if e[1] == "nextlong-convert"],
                         ids=lambda value: value if isinstance(value, str) else None)
def test_convert_example_parses(where, tool, args):
    from nextlong_jax.convert_cli import build_parser

    build_parser().parse_args(args)  # `make demo` runs orbax-to-hf and verify for real


@pytest.mark.parametrize("where,tool,args", [e for e in EXAMPLES if e[1] == "nextlong-eval"],
                         ids=lambda value: value if isinstance(value, str) else None)
def test_eval_example_parses_and_its_config_loads(where, tool, args, monkeypatch):
    from nextlong_eval.cli import build_parser
    from nextlong_jax.train_config import load_config

    monkeypatch.chdir(ROOT)
    parser = build_parser()
    parsed, lm_eval_args = parser.parse_known_args(args)  # `make demo` runs one for real
    assert not lm_eval_args or parsed.command == "harness", lm_eval_args  # lm-eval's options go to lm-eval
    if parsed.command == "ablation":
        from nextlong_eval.ablation import AblationConfig

        load_config(AblationConfig.load(parsed.config).train_config, ["data.source=unused"])
    else:
        load_config(parsed.config, ["data.source=unused", *parsed.overrides])


TRAIN_EXAMPLES = [e for e in EXAMPLES if e[1] == "nextlong-train"]


@pytest.mark.parametrize("where,tool,args", TRAIN_EXAMPLES, ids=lambda value: value if isinstance(value, str) else None)
def test_train_example_parses_and_its_config_loads(where, tool, args, monkeypatch):
    from nextlong_jax.topology import parse_topology
    from nextlong_jax.train_cli import build_parser
    from nextlong_jax.train_config import load_config

    monkeypatch.chdir(ROOT)
    parsed = build_parser().parse_args(args)
    overrides = list(parsed.overrides) + [f"data.source={json.dumps(parsed.data or ['unused'])}"]
    if parsed.data_weights:
        overrides.append(f"data.weights={json.dumps(parsed.data_weights)}")
    config = load_config(parsed.config, overrides)
    if parsed.compile_only:
        parse_topology(parsed.topology or config.mesh.topology)


def test_tiny_model_examples_run_at_toy_size(toy, tmp_path, monkeypatch):
    """The tiny preset's header, as written: synthesize, then train on the result."""
    from nextlong_jax.train_cli import main as train_main

    monkeypatch.chdir(ROOT)
    header = [args for where, tool, args in EXAMPLES if where == "configs/train/tiny-cpu.yaml"]
    synth = [args for args in header if "--data" not in args]
    train = [args for args in header if "--data" in args]
    assert synth and train
    data = _value(train[0], "--data")
    argv = [*synth[0], "--meta", str(toy), "--max-meta-docs", "8", "--embedder", "hashing", "--num-shards", "1",
            "--max-sequences", "2", "--out", str(tmp_path / data)]
    assert synth_main(argv) == 0
    argv = [a if a != data else str(tmp_path / data) for a in train[0]]
    out = _value(argv, "--out")
    argv = [a if a != out else str(tmp_path / out) for a in argv]
    assert train_main([*argv, "train.steps=1", "checkpoint.every=1"]) == 0
    assert (tmp_path / out / "checkpoints" / "1").is_dir()
