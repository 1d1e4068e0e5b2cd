"""`nextlong-eval harness`: this stack as an lm-evaluation-harness model gives lm-eval's own `hf` model's
samples on the same weights (SmolLM2-135M-Instruct): RULER's download-free generation tasks, and
log-likelihoods (multiple choice, rolling) on tasks made from local data; bad input is one line."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import SMOLLM2_BLOCKS

ROOT = Path(__file__).resolve().parents[1]
# RULER's tasks that need no download: the suite runs one (the 12-minute budget), NEXTLONG_HARNESS_TASKS=all
# all six.
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_TASKS = RULER_OFFLINE if os.environ.get("NEXTLONG_HARNESS_TASKS") == "all" else ("niah_single_1",)
LENGTH = 4096


def _local_tasks(where: Path) -> Path:
    """Two tasks over local JSONL files: four-way multiple choice, and a rolling log-likelihood."""
    docs = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin", " Madrid"], "answer": 0},
            {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin", " tall", " blue"],
             "answer": 0},
            {"question": "def add(a, b):\n    return", "choices": [" a + b", " a * b", " None", " 42"], "answer": 0}]
    texts = [{"text": (ROOT / "README.md").read_text()[i * 1500:(i + 1) * 1500]} for i in range(2)]
    (where / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (where / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in texts))
    common = "dataset_path: json\ntest_split: train\n"
    (where / "local_mc.yaml").write_text(
        f"task: local_mc\n{common}dataset_kwargs:\n  data_files: {where / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (where / "local_rolling.yaml").write_text(
        f"task: local_rolling\n{common}dataset_kwargs:\n  data_files: {where / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    return where


def _samples(out: Path) -> dict[str, list[dict]]:
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        found[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return found


def _fresh_ruler_generators() -> None:
    """lm-eval's cwe generator draws from a module-level random state that carries over from one evaluation to
    the next in a process: each side starts it afresh, as in a process of its own. (The other generators'
    modules hold constants: they stay, and niah's, 8 s to import, is imported once.)"""
    sys.modules.pop("lm_eval.tasks.ruler.cwe_utils", None)


def _one_task_index(monkeypatch) -> None:
    """lm-eval reads every one of its ~15,000 task YAML files to index them at each evaluation (~6 s); the two
    evaluations here index the same files, so the second gets a copy of the first's index."""
    from lm_eval.tasks._index import TaskIndex

    built, build = {}, TaskIndex.build

    def once(paths, **options):
        key = (tuple(map(str, paths)), tuple(sorted(options.items())))
        if key not in built:
            built[key] = build(paths, **options)
        return copy.deepcopy(built[key])

    monkeypatch.setattr(TaskIndex, "build", staticmethod(once))


@pytest.mark.slow
def test_samples_equal_lm_eval_hf(smollm2, tmp_path, capsys, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    from nextlong_eval.cli import main

    monkeypatch.chdir(ROOT)
    _one_task_index(monkeypatch)
    tasks = _local_tasks(tmp_path)
    lm_eval_args = ["--tasks", ",".join((*RULER_TASKS, "local_mc", "local_rolling")), "--include_path", str(tasks),
                    "--limit", "1", "--metadata", json.dumps({"max_seq_lengths": [LENGTH]}), "--log_samples"]
    _fresh_ruler_generators()
    assert main(["harness", "--hf", str(smollm2), "--config", "configs/train/tiny-cpu.yaml",
                 "--set", SMOLLM2_BLOCKS, *lm_eval_args, "--output_path", str(tmp_path / "ours")]) == 0
    assert f"results written under {tmp_path / 'ours'}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["lm-eval", "run", "--model", "hf", "--device", "cpu", "--model_args",
                                      f"pretrained={smollm2},dtype=float32", *lm_eval_args,
                                      "--output_path", str(tmp_path / "hf")])
    _fresh_ruler_generators()
    cli_evaluate()
    ours, theirs = _samples(tmp_path / "ours"), _samples(tmp_path / "hf")
    assert set(ours) == set(theirs) == {*RULER_TASKS, "local_mc", "local_rolling"}
    for task in RULER_TASKS:
        for mine, peer in zip(ours[task], theirs[task], strict=True):
            assert mine["arguments"] == peer["arguments"], task  # the same prompt, from the same tokenizer
            assert mine["filtered_resps"] == peer["filtered_resps"], task
            assert mine[str(LENGTH)] == peer[str(LENGTH)], task
    assert max(s[str(LENGTH)] for task in RULER_TASKS for s in ours[task]) > 0  # the model answers something
    for task, tolerance in (("local_mc", 1e-3), ("local_rolling", 1e-5)):  # rolling: relative, on a ~-1900 sum
        for mine, peer in zip(ours[task], theirs[task], strict=True):
            for (a, greedy_a), (b, greedy_b) in zip(_pairs(mine["resps"]), _pairs(peer["resps"]), strict=True):
                assert abs(a - b) <= tolerance * (abs(b) if task == "local_rolling" else 1), (task, a, b)
                assert greedy_a == greedy_b, task
    assert all(s["acc"] == 1.0 for s in ours["local_mc"])  # a model that reads


def _pairs(resps: list) -> list[tuple[float, bool | None]]:
    """(log-likelihood, is greedy) of each response, as lm-eval writes them (strings): multiple choice
    gives [[ll, greedy]] per choice, rolling [ll]."""
    return [(float(r[0][0]), r[0][1] == "True") if isinstance(r[0], list) else (float(r[0]), None) for r in resps]


def test_harness_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from nextlong_eval.cli import main

    monkeypatch.chdir(ROOT)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    for model, extra, message in ((llama, ["--tasks", "ruler_nonesuch"], "lm-eval knows no task ruler_nonesuch"),
                                  (llama, ["--limit", "1"], "name the lm-eval tasks"),
                                  (tmp_path, ["--tasks", "niah_single_1"], "no config.json"),
                                  (gpt2, ["--tasks", "niah_single_1"], "only LlamaForCausalLM converts")):
        common = ["harness", "--hf", str(model), "--config", "configs/train/tiny-cpu.yaml"]
        assert main([*common, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):  # lm-eval's options belong to `harness` alone
        main(["probes", "--hf", str(tmp_path), "--config", "x.yaml", "--out", "o", "--limit", "1"])
    assert "unrecognized arguments: --limit" in capsys.readouterr().err
