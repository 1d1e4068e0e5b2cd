"""Every training preset in configs/train loads, builds its mesh on 8 virtual CPU devices, and traces
its full train step at its real size (8B parameters, 512K tokens: shapes only, nothing allocated)."""

from __future__ import annotations

import sys
from pathlib import Path

from multidevice import run_on_8_devices

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))
# The tiny preset's batch of 2 cannot split over 8 fsdp shards; its own mesh is one device.
OVERRIDES = {"tiny-cpu": ["data.batch_size=8"]}


def test_presets_trace_on_8_devices():
    out = run_on_8_devices(__file__, *map(str, PRESETS))
    assert {line.split()[0] for line in out.splitlines() if line.endswith(" ok")} == {p.stem for p in PRESETS}


def _trace(paths: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.train_setup import abstract_state, build, build_mesh, jit_step
    from nextlong_jax.train_config import load_config

    for path in map(Path, paths):
        config = load_config(path, ["data.source=unused", *OVERRIDES.get(path.stem, [])])
        mesh = build_mesh(config)
        with jax.set_mesh(mesh), axis_rules():
            setup = build(config, mesh)
            shape = (config.data.batch_size, config.data.seq_len)
            ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
            batch = dict(input_ids=ids, positions=ids, segment_ids=ids, token_roles=ids,
                         loss_weights=jax.ShapeDtypeStruct(shape, jnp.float32, sharding=setup.batch_sharding))
            text = jit_step(setup, config.optimizer.grad_accum).lower(abstract_state(setup), batch).as_text()
        # A sequence-parallel preset must really run the ring (its collective permutes).
        assert (mesh.shape["sequence"] > 1) == ("collective_permute" in text), path.stem
        print(path.stem, dict(mesh.shape), "ok", flush=True)


if __name__ == "__main__":
    _trace(sys.argv[1:])
