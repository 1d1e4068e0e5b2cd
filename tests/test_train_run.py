"""The `nextlong-train` command end to end on freshly synthesized data: the loss goes down, and a run
killed with SIGKILL then rerun gives the per-step losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import train_in_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
# Smaller than the preset so three runs fit in a test; the vocabulary stays Llama-3's. Dropout makes
# every step draw from the training key, so equal losses after the kill also mean the key was restored.
ARGS = ["train.steps=6", "checkpoint.every=2", "data.batch_size=1", "model.hidden_size=32",
        "model.intermediate_size=64", "optimizer.learning_rate=1e-2", "model.dropout_rate=0.1"]


# For the tests of resuming and of errors, where the schedule is not what is checked: a constant rate
# leaves train.steps out of the compiled step, so their runs (2 to 1000 steps) all start the one program
# and, after the first, load it from the test run's compilation cache (tests/conftest.py).
CONSTANT_LR = "optimizer.decay=constant"


def _command(data: Path, out: Path, *overrides: str) -> list[str]:
    """`nextlong-train` on the small model; `overrides` come after ARGS, so they win."""
    return [sys.executable, "-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml",
            "--data", str(data), "--out", str(out), *ARGS, *overrides]


def _in_process(capsys, data: Path | str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A run that needs no signal, in this process."""
    return train_in_process(capsys, _command(data, out, *overrides)[3:])


def _train(data: Path, out: Path, *overrides: str, env: dict[str, str] = ENV) -> subprocess.Popen:
    return subprocess.Popen(_command(data, out, *overrides), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# Without the test run's shared cache: each run keeps its own, in OUT/jax-cache (train.compilation_cache).
OWN_CACHE = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _committed(out: Path) -> list[int]:
    ckpts = out / "checkpoints"
    # orbax writes STEP.orbax-checkpoint-tmp and renames it to STEP once complete
    return [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []


def test_sigkill_resume_reproduces_losses_and_loss_goes_down(train_data, tmp_path, capsys):
    # The victim and the reference (in this process) at once: two cores, and the results must not care. The
    # victim dies right after it starts saving step 4, which orbax begins once step 2's save is complete.
    victim = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_at.py"),
                               "nextlong_jax.checkpoint:Checkpointer.save", "4",
                               *_command(train_data, tmp_path / "killed")[1:]],
                              cwd=ROOT, env=OWN_CACHE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference = _in_process(capsys, train_data, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    ref_out = reference.stdout
    victim_out, _ = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim_out
    assert 2 in _committed(tmp_path / "killed") and "step 4/6" in victim_out
    resumed = _train(train_data, tmp_path / "killed", env=OWN_CACHE)
    res_out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, res_out
    assert "resumed from step" in res_out
    # The restart compiled nothing: every program came from the cache the killed run left in its directory.
    loaded = re.search(rf"compilation cache {tmp_path / 'killed' / 'jax-cache'}: (\d+) program\(s\) loaded, "
                       r"(\d+) compiled", res_out)
    assert loaded and int(loaded[1]) > 0 and loaded[2] == "0", res_out[-3000:]
    resumed_from = int(res_out.split("resumed from step ")[1].split()[0])
    assert "summary: steps 1-6 of 6, loss " in ref_out and f"summary: steps {resumed_from + 1}-6 of 6" in res_out

    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert got == want  # bit-identical: same data order, same restored state, same program
    assert want[6] < want[1] - 0.3, want
    row = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row) == {"step", "loss", "meta_loss", "negative_loss", "lr", "grad_norm", "tokens_per_s"}
    assert any((tmp_path / "ref" / "tensorboard").iterdir())
    # The run's pictures are drawn at its end, next to the metrics they show.
    assert f"plots: {tmp_path / 'ref' / 'loss.png'}" in ref_out
    for name in ("loss.png", "throughput.png"):
        assert (tmp_path / "ref" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_loss_by_role_and_throughput_from_the_metrics(tmp_path, capsys):
    """Each role's curve is drawn in its own colour (steps 1-3 lack the negative loss: a run of meta
    tokens only); a run without metrics is a one-line error."""
    from matplotlib.image import imread

    from nextlong_jax.train_cli import main

    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "meta_loss": 5.5 - 0.1 * s, "negative_loss": None if s < 4 else 4.0,
             "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    assert main(["plot", str(tmp_path)]) == 0
    image = imread(tmp_path / "loss.png")[..., :3]
    colours = {tuple(c) for c in np.round(image.reshape(-1, 3) * 10).astype(int).tolist()}
    # matplotlib's first three line colours (blue, orange, green), in tenths, are all on the page.
    assert {(1, 5, 7), (10, 5, 1), (2, 6, 2)} <= colours
    assert imread(tmp_path / "throughput.png").shape[1] == 700
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    from nextlong_jax.train_cli import main

    assert main(["--config", "configs/train/tiny-cpu.yaml", "--out", str(tmp_path), "train.stepz=1"]) == 1
    assert capsys.readouterr().err.strip() == ("nextlong-train: error: unknown key train.stepz "
                                               "(known in train: compilation_cache, max_consecutive_nonfinite, "
                                               "peak_flops_per_device, seed, steps)")
    assert main(["--config", "configs/train/tiny-cpu.yaml", "--out", str(tmp_path),
                 "--data", str(tmp_path / "none-*.tfrecord")]) == 1
    assert "no TFRecord shards match" in capsys.readouterr().err


def test_old_and_damaged_checkpoints(train_data, tmp_path, capsys):
    """A checkpoint from before training keys were saved resumes; a damaged one is a one-line error."""
    def run(steps: int) -> subprocess.CompletedProcess:
        return _in_process(capsys, train_data, tmp_path, CONSTANT_LR, f"train.steps={steps}")

    assert run(2).returncode == 0
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "rng")
    resumed = run(3)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "opt_state")
    damaged = run(4)
    assert damaged.returncode == 1, damaged.stderr
    assert damaged.stderr.strip().splitlines()[-1].startswith("nextlong-train: error: cannot resume from"), damaged.stderr


def test_sigterm_saves_stops_and_resumes(train_data, tmp_path, capsys):
    proc = _train(train_data, tmp_path, CONSTANT_LR, "checkpoint.every=1000", "train.steps=1000")
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "no training steps"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # not 0: the run did not reach train.steps
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert saved >= 2 and saved in _committed(tmp_path)  # saved although no save was due
    resumed = _in_process(capsys, train_data, tmp_path, CONSTANT_LR, "checkpoint.every=1000", f"train.steps={saved + 1}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {saved}" in resumed.stdout


def test_a_damaged_shard_stops_training_in_one_line(train_data, tmp_path, capsys):
    """A shard cut to half (an interrupted copy): with the manifest, refused before step 1; read by
    glob, the step that reaches it stops the run naming the file, exit 1, and only whole
    checkpoints of good steps remain."""
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    shard = sorted(data.glob("*.tfrecord"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for source, message in ((data, f"shard {shard} is "), (data / "*.tfrecord", f"{shard}: record ")):
        out = tmp_path / f"run-{len(message)}"
        run = _in_process(capsys, source, out, CONSTANT_LR, "train.steps=40")
        error = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 1 and error.startswith("nextlong-train: error: ") and message in error, run.stderr[-2000:]
        ckpts = out / "checkpoints"
        leftovers = [p.name for p in ckpts.iterdir() if not p.name.isdigit()] if ckpts.exists() else []
        assert not leftovers, leftovers


def test_every_step_program_is_compiled_before_step_1(train_data, tmp_path, capsys):
    """A mixture of whole rows and rows of two packed 256-token documents: both programs are compiled
    before the first step, whichever kind of batch it draws."""
    from synth.cli import main as synth_main

    packed = tmp_path / "packed"
    assert synth_main(["--meta", "sample:pydocs", "--max-meta-docs", "16", "--embedder", "hashing", "--seq-len",
                       "512", "--doc-len", "256", "--chunk-tokens", "64", "--num-shards", "1",
                       "--out", str(packed)]) == 0
    capsys.readouterr()
    cmd = _command(train_data, tmp_path / "run", CONSTANT_LR, "train.steps=4")
    data_at = cmd.index("--data")
    proc = train_in_process(capsys, cmd[3:data_at + 2] + ["--data", str(packed)] + cmd[data_at + 2:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    compiled = next(i for i, line in enumerate(lines) if "train step compiled for" in line)
    assert "whole rows and rows of 2 documents in slots" in lines[compiled]
    assert not any("step 1/4" in line for line in lines[:compiled])


def test_a_mixture_of_sources_trains_and_mismatched_weights_are_one_line(train_data, tmp_path, capsys):
    out = tmp_path / "mix"
    cmd = _command(train_data, out, CONSTANT_LR, "train.steps=2")
    data_at = cmd.index("--data")
    extra = ["--data", str(train_data / "*.tfrecord"), "--data-weights", "1", "3"]
    mixed = cmd[:data_at + 2] + extra + cmd[data_at + 2:]
    proc = train_in_process(capsys, mixed[3:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "checkpoints" / "2" / "progress" / "metadata").read_text())["train_config"]["data"][
        "weights"] == [1.0, 3.0]
    bad = mixed[:mixed.index("--data-weights") + 2] + mixed[mixed.index("--data-weights") + 3:]
    refused = train_in_process(capsys, bad[3:])
    assert refused.returncode == 1
    assert "weights [1.0] must be 2 positive numbers, one per source" in refused.stderr.strip().splitlines()[-1]
