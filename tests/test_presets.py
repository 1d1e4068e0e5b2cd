"""Every training preset in configs/train loads, builds its mesh on 8 virtual CPU devices, and traces
its full train step at its real size (8B parameters, 512K tokens: shapes only, nothing allocated).

Golden sharding specs: the PartitionSpec of every parameter, optimizer-state leaf and batch feature
of each preset is pinned in tests/golden/sharding/<preset>.json (MaxText keeps such files too). A
change to the logical rules or the model that moves any of them fails here; when the move is
intended, regenerate with `NEXTLONG_UPDATE_GOLDEN=1 pytest tests/test_presets.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from multidevice import run_on_8_devices

pytestmark = pytest.mark.multiprocess

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "sharding"
# The tiny preset's batch of 2 cannot split over 8 fsdp shards; its own mesh is one device.
OVERRIDES = {"tiny-cpu": ["data.batch_size=8"],
             # A one-GPU preset's 8 microbatches of one row cannot split over 8 fsdp shards either.
             "llama3.2-1b-32k-h100": ["optimizer.grad_accum=1"],
             "smollm2-135m-64k-h100": ["optimizer.grad_accum=1", "data.batch_size=8"]}


def test_presets_trace_on_8_devices_with_golden_sharding_specs():
    out = run_on_8_devices(__file__, *map(str, PRESETS))
    assert {line.split()[0] for line in out.splitlines() if line.endswith(" ok")} == {p.stem for p in PRESETS}
    specs = {name: json.loads(text) for name, text in
             (line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("SPECS "))}
    assert set(specs) == {p.stem for p in PRESETS}
    for name, got in specs.items():
        path = GOLDEN / f"{name}.json"
        if os.environ.get("NEXTLONG_UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_golden_text(got))
        assert path.exists(), f"no golden specs for preset {name}: run with NEXTLONG_UPDATE_GOLDEN=1"
        want = json.loads(path.read_text())
        moved = {f"{part}/{key}": (want[part].get(key), spec) for part in got for key, spec in got[part].items()
                 if want.get(part, {}).get(key) != spec}
        missing = {f"{part}/{key}" for part in want for key in want[part] if key not in got.get(part, {})}
        assert not moved and not missing, f"{name}: sharding moved {moved}, leaves gone {missing}"


def _golden_text(specs: dict[str, dict[str, list]]) -> str:
    """JSON with one leaf per line, so a moved spec is a one-line diff."""
    parts = (f' "{part}": {{\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(leaves.items()))
             + "\n }" for part, leaves in sorted(specs.items()))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _specs(setup) -> dict[str, dict[str, list]]:
    import jax

    def table(tree):
        return {jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a for a in sharding.spec]
                for path, sharding in jax.tree_util.tree_leaves_with_path(tree)}

    return {"params": table(setup.state_shardings.params), "opt_state": table(setup.state_shardings.opt_state),
            "batch": table({"every_feature": setup.batch_sharding})}


def _trace(paths: list[str]) -> None:
    import jax

    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.train_config import load_config
    from nextlong_jax.train_setup import abstract_batch, abstract_state, build, build_mesh, jit_step

    for path in map(Path, paths):
        config = load_config(path, ["data.source=unused", *OVERRIDES.get(path.stem, [])])
        mesh = build_mesh(config)
        with jax.set_mesh(mesh), axis_rules():
            setup = build(config, mesh)
            batch = abstract_batch(setup, config.data.batch_size, config.data.seq_len)
            text = jit_step(setup, config.optimizer.grad_accum).lower(abstract_state(setup), batch).as_text()
        # A sequence-parallel preset must really run sequence-parallel attention (the ring's
        # collective permutes: on this CPU splash falls back to the ring).
        assert (mesh.shape["sequence"] > 1) == ("collective_permute" in text), path.stem
        print("SPECS", path.stem, json.dumps(_specs(setup)), flush=True)
        print(path.stem, dict(mesh.shape), "ok", flush=True)


if __name__ == "__main__":
    _trace(sys.argv[1:])
