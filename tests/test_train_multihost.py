"""Two processes with 4 virtual CPU devices each, joined by `jax.distributed` (gloo) as two hosts of
one job: `nextlong-train` trains on a (data=2, fsdp=2, sequence=2) mesh spanning both, each host
reading its own shard file, checkpoints, and resumes; the per-step losses equal one process with 8
devices stepping through the same global batches (host 0's rows, then host 1's)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from multidevice import run_on_8_devices

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 2
# Constant lr, so the schedule does not depend on train.steps and the run can be cut in two.
ARGS = ["data.batch_size=4", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2", "model.attention_backend=ring",
        "model.hidden_size=32", "model.intermediate_size=64", "optimizer.decay=constant",
        "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2", "checkpoint.every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_hosts(data: Path, out: Path, steps: int) -> list[str]:
    port = _free_port()
    procs = []
    for host in range(HOSTS):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(HOSTS),
               "JAX_PROCESS_ID": str(host)}
        cmd = [sys.executable, "-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml",
               "--data", str(data), "--out", str(out), *ARGS, f"train.steps={steps}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text
    return outputs


def test_two_hosts_train_resume_and_match_one_process(train_data, tmp_path):
    out = tmp_path / "run"
    _run_two_hosts(train_data, out, steps=2)
    first, second = _run_two_hosts(train_data, out, steps=4)
    assert "resumed from step 2" in first
    assert "step 3/4" not in second  # only host 0 reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    want = json.loads(run_on_8_devices(__file__, str(train_data)).splitlines()[-1])
    np.testing.assert_allclose(got, want, rtol=2e-5)


def _one_process_reference(data: str) -> None:
    """The same 4 steps in one process; each step's batch is every host's next batch, host 0 first."""
    import jax

    from nextlong_jax.data import BatchIterator, find_shards, host_shards
    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.train import build, build_mesh, global_batch, init_state, jit_step
    from nextlong_jax.train_config import load_config

    config = load_config(ROOT / "configs/train/tiny-cpu.yaml", [*ARGS, "train.steps=4", f"data.source={data}"])
    shards = find_shards(config.data.source, config.data.seq_len)
    per_host = config.data.batch_size // HOSTS
    hosts = [BatchIterator(host_shards(shards, h, HOSTS), config.data, per_host,
                           negative_weight=config.loss.negative_weight) for h in range(HOSTS)]
    mesh = build_mesh(config)
    losses = []
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        state, step = init_state(setup, config.train.seed), jit_step(setup, config.optimizer.grad_accum)
        for _ in range(4):
            parts = [next(h) for h in hosts]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = step(state, global_batch(batch, setup.batch_sharding))
            losses.append(float(metrics["loss"]))
    print(json.dumps(losses))


if __name__ == "__main__":
    _one_process_reference(sys.argv[1])
