"""Every accelerator preset compiles at its stated topology (`mesh.topology`) through
`nextlong-train --compile-only`, fits the chip, runs the attention kernel it names, and its header
states the per-chip memory this compile finds (so a header cannot drift from the program).

Each 8B compile takes 10 s (GPU) to 7 minutes (TPU, 128K) on 2 cores. The plans are recorded in
tests/golden/plans, keyed by the fingerprint of everything the compile depends on
(`nextlong_jax.compile_only.fingerprint`): a preset whose step is unchanged is lowered, found there
and checked against its recorded plan in seconds; a changed one is compiled and checked, and then
fails until its new plan is recorded (`make plans`) and committed with the change. Under other
compiler versions than the recorded ones every preset is compiled, and nothing asks to record.
The plans are recorded in one checkout and checked in others (CI's clean clone among them), so a
fingerprint that depended on where the repository lies would fail here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nextlong_jax.model.attention.backends import resolve
from nextlong_jax.topology import parse_topology
from nextlong_jax.train_config import load_config

pytestmark = pytest.mark.compile

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "plans"
RECORD = os.environ.get("NEXTLONG_RECORD_PLANS") == "1"  # `make plans`: write GOLDEN instead of reading it
# What the compiled program must contain for each configured backend.
KERNELS = {"splash": "splash_mha_fwd", "pallas_gpu": "mha_forward", "ring": None}


def _plan(preset: Path) -> str:
    """The settings its compiled plan depends on. Left out: rope_theta and the learning-rate schedule
    (scalars inside the step: no shape, sharding, kernel or memory figure changes with them), the
    step count and checkpointing (outside the step)."""
    config = load_config(preset).to_dict()
    del config["model"]["rope_theta"], config["optimizer"]["learning_rate"], config["optimizer"]["warmup_steps"]
    del config["train"], config["checkpoint"]
    return json.dumps(config, sort_keys=True)


ACCELERATOR = [p for p in sorted((ROOT / "configs" / "train").glob("*.yaml")) if load_config(p).mesh.topology]
# One full 8B compile (minutes) per distinct plan: a preset whose plan equals another's, such as
# llama3-8b-64k-prolong (llama3-8b-64k with the authors' rope_theta and learning rates), would
# compile the same program again. Of such twins the shortest name, the preset the others extend,
# compiles; the others' headers must state its figure.
FIRST: dict[str, Path] = {}
for _preset in sorted(ACCELERATOR, key=lambda p: (len(p.stem), p.stem)):
    FIRST.setdefault(_plan(_preset), _preset)
PRESETS = sorted(FIRST.values())
TWINS = [(p, FIRST[_plan(p)]) for p in ACCELERATOR if p not in PRESETS]


def _stated_gib(preset: Path, slots: int = 1) -> float:
    """The per-chip memory the header states for the step of whole rows, or of rows of `slots` documents."""
    pattern = r"^#\s+\S+: ([\d.]+) GiB per chip" if slots == 1 else \
        rf"^#\s+rows of {slots} documents in slots[^:\n]*: ([\d.]+) GiB per chip"
    stated = re.search(pattern, preset.read_text(), re.M)
    assert stated, f"{preset.name}: the header must state the compiled per-chip memory ({slots} slot(s) a row)"
    return float(stated[1])


def test_accelerator_presets_exist():
    assert {p.stem for p in PRESETS} >= {"llama3-8b-64k", "llama3-8b-512k", "llama3-8b-64k-h100"}
    assert ("llama3-8b-64k-prolong", "llama3-8b-64k") in {(a.stem, b.stem) for a, b in TWINS}


@pytest.mark.parametrize("twin,compiled", TWINS, ids=[p.stem for p, _ in TWINS])
def test_a_preset_compiled_as_another_states_its_figure(twin, compiled):
    assert load_config(twin).mesh.topology == load_config(compiled).mesh.topology
    assert _stated_gib(twin) == _stated_gib(compiled)


def _compile(preset: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the plans were recorded without (the fingerprint includes them)
    return subprocess.run([sys.executable, "-m", "nextlong_jax.train_cli", "--config", str(preset), "--compile-only",
                           "--plan-cache", str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def compiles(request, tmp_path_factory):
    """The selected presets' plans, all started at once, as many at a time as there are cores: XLA
    compiles one program mostly on one thread. Each test waits for its own. The cache is a copy of
    GOLDEN (a test run never writes the repository), or GOLDEN itself when recording, pruned
    afterwards to the plans of today's presets."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if item.module.__name__ == request.module.__name__]
    selected = [p["preset"] for p in params if "preset" in p]
    cache = GOLDEN if RECORD else tmp_path_factory.mktemp("plans")
    if not RECORD and GOLDEN.is_dir():
        shutil.copytree(GOLDEN, cache, dirs_exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(selected), len(os.sched_getaffinity(0)))))
    futures = {preset: pool.submit(_compile, preset, cache) for preset in selected}
    yield futures
    pool.shutdown(cancel_futures=True)
    if RECORD and set(selected) == set(PRESETS) and all(f.result().returncode == 0 for f in futures.values()):
        plans = [json.loads(f.result().stdout.strip().splitlines()[-1]) for f in futures.values()]
        current = {p["fingerprint"] for plan in plans for p in (plan, *plan["slot_programs"])}
        for entry in GOLDEN.glob("*.json"):
            if json.loads(entry.read_text())["fingerprint"] not in current:
                entry.unlink()


def _recorded_compilers() -> list[dict]:
    return [json.loads(entry.read_text())["compilers"] for entry in GOLDEN.glob("*.json")]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_compiles_and_fits_its_topology(preset, compiles):
    config = load_config(preset)
    proc = compiles[preset].result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["compiled"] and plan["fits"] and plan["topology"] == config.mesh.topology
    # `auto` resolved for the target, not this CPU
    backend = resolve(config.runtime.attention_backend, parse_topology(config.mesh.topology).platform,
                      sequence_shards=config.mesh.sequence).value
    assert plan["attention_backend"] == backend
    kernel = KERNELS[backend]
    if kernel:
        assert any(kernel in k for k in plan["attention_kernels"]), plan["attention_kernels"]
    else:
        assert plan["attention_kernels"] == []
    assert abs(_stated_gib(preset) - plan["total_gib"]) < 0.1, (_stated_gib(preset), plan["total_gib"])
    # The head is gathered and its gradient reduced once per microbatch, not once per vocabulary block,
    # unless the preset asks for the per-block collectives (runtime.loss_gathers_head: false).
    for program in (plan, *plan["slot_programs"]):
        assert bool(program["loss_loop_collectives"]) != config.runtime.loss_gathers_head, program
    # A packed source's rows (data.document_lens) train through a program of their own: planned too.
    assert [p["slots"] for p in plan["slot_programs"]] == sorted(config.data.seq_len // n for n in config.data.document_lens)
    for slotted in plan["slot_programs"]:
        assert slotted["fits"] and slotted["attention_backend"] == backend, slotted
        assert abs(_stated_gib(preset, slotted["slots"]) - slotted["total_gib"]) < 0.1, slotted["total_gib"]
        assert slotted["cached"] or RECORD or slotted["compilers"] not in _recorded_compilers(), (
            f"{preset.name}: its slot rows' step changed since tests/golden/plans was recorded; run `make plans`")
    # Checked above either way; a step changed under the recorded compilers must be recorded, or every
    # later run compiles it again.
    assert plan["cached"] or RECORD or plan["compilers"] not in _recorded_compilers(), (
        f"{preset.name}: its step changed since tests/golden/plans was recorded; it compiled and passed here "
        f"({plan['compile_seconds']:.0f} s). Run `make plans` and commit tests/golden/plans with the change.")
