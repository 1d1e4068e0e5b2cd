"""Two processes with 4 virtual CPU devices each, joined by `jax.distributed` (gloo) as two hosts of
one job, run `nextlong-train`; the per-step losses equal one process with 8 devices stepping through
the same global batches. Two layouts: (data=2, fsdp=2, sequence=2), where each host reads its own
shard file for its own rows, and both are preempted at one step, save it and resume; and
sequence=8, where the ring spans both hosts, so both read the same rows and each keeps its half of
the columns."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from multidevice import run_on_8_devices

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 2
# Constant lr, so the schedule does not depend on train.steps and the run can be cut in two.
ARGS = ["runtime.attention_backend=ring", "model.hidden_size=32", "model.intermediate_size=64",
        "optimizer.decay=constant", "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2", "checkpoint.every=2"]
# layout -> (overrides, how many different row blocks the hosts read)
LAYOUTS = {"rows": (["data.batch_size=4", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2"], 2),
           "sequence": (["data.batch_size=2", "mesh.data=1", "mesh.fsdp=1", "mesh.sequence=8"], 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data: Path, out: Path, layout: str, steps: int) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for host in range(HOSTS):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(HOSTS),
               "JAX_PROCESS_ID": str(host)}
        cmd = [sys.executable, "-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml",
               "--data", str(data), "--out", str(out), *ARGS, *LAYOUTS[layout][0], f"train.steps={steps}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen], code: int = 0) -> list[str]:
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == code, text
    return outputs


def _run_two_hosts(data: Path, out: Path, layout: str, steps: int) -> list[str]:
    return _finish(_launch(data, out, layout, steps))


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def _reference(data: Path, layout: str, steps: int) -> list[float]:
    return json.loads(run_on_8_devices(__file__, str(data), layout, str(steps)).splitlines()[-1])


def test_ring_across_two_hosts_matches_one_process(train_data, tmp_path):
    _run_two_hosts(train_data, tmp_path, "sequence", steps=2)
    np.testing.assert_allclose(_losses(tmp_path), _reference(train_data, "sequence", 2), rtol=2e-5)


def test_sigterm_on_one_host_stops_both_at_one_saved_step_and_the_resumed_run_matches_one_process(
        train_data, tmp_path):
    """As when one VM of a pod gets a maintenance notice: jax's preemption sync picks one step for
    all, both save it, and the resumed run's losses are those of one uninterrupted process."""
    procs = _launch(train_data, tmp_path, "rows", steps=1000)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no training steps"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    first, _ = _finish(procs, code=143)
    saved = int(first.split("preempted: saved step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / str(saved) / "params").is_dir()
    last = saved + 1
    first, second = _run_two_hosts(train_data, tmp_path, "rows", steps=last)
    assert first.count(f"resumed from step {saved}") == 1
    assert f"step {last}/{last}" in first and f"step {last}/{last}" not in second  # only host 0 reports
    np.testing.assert_allclose(_losses(tmp_path), _reference(train_data, "rows", last), rtol=2e-5)


def _one_process_reference(data: str, layout: str, steps: int) -> None:
    """The same steps in one process; each step's batch is every row block's next batch, block 0 first."""
    import jax

    from nextlong_jax.data import BatchIterator, find_shards, host_shards
    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.host_data import global_batch
    from nextlong_jax.train_setup import build, build_mesh, init_state, jit_step
    from nextlong_jax.train_config import load_config

    overrides, blocks = LAYOUTS[layout]
    config = load_config(ROOT / "configs/train/tiny-cpu.yaml",
                         [*ARGS, *overrides, f"train.steps={steps}", f"data.source={data}"])
    shards = find_shards(config.data.source, config.data.seq_len)
    per_block = config.data.batch_size // blocks
    hosts = [BatchIterator(host_shards(shards, b, blocks), config.data, per_block,
                           negative_weight=config.loss.negative_weight) for b in range(blocks)]
    mesh = build_mesh(config)
    losses = []
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        state, step = init_state(setup, config.train.seed), jit_step(setup, config.optimizer.grad_accum)
        for _ in range(steps):
            parts = [next(h).rows for h in hosts]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = step(state, global_batch(batch, setup.batch_sharding))
            losses.append(float(metrics["loss"]))
    print(json.dumps(losses))


if __name__ == "__main__":
    _one_process_reference(sys.argv[1], sys.argv[2], int(sys.argv[3]))
