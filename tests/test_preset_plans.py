"""Every accelerator preset compiles at its stated topology (`mesh.topology`) through
`nextlong-train --compile-only`, fits the chip, runs the attention kernel it names, and its header
states the per-chip memory this compile finds (so a header cannot drift from the program).

Each 8B compile takes 10 s (GPU) to a few minutes (TPU, 512K) on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nextlong_jax.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [p for p in sorted((ROOT / "configs" / "train").glob("*.yaml")) if load_config(p).mesh.topology]
# What the compiled program must contain for each configured backend.
KERNELS = {"splash": "splash_mha_fwd", "pallas_gpu": "mha_forward", "ring": None}


def test_accelerator_presets_exist():
    assert {p.stem for p in PRESETS} >= {"llama3-8b-64k", "llama3-8b-512k", "llama3-8b-64k-h100"}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_compiles_and_fits_its_topology(preset):
    config = load_config(preset)
    proc = subprocess.run([sys.executable, "-m", "nextlong_jax.train_cli", "--config", str(preset), "--compile-only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["compiled"] and plan["fits"] and plan["topology"] == config.mesh.topology
    assert plan["attention_backend"] == config.model.attention_backend  # resolved for the target, not this CPU
    kernel = KERNELS[config.model.attention_backend]
    if kernel:
        assert any(kernel in k for k in plan["attention_kernels"]), plan["attention_kernels"]
    else:
        assert plan["attention_kernels"] == []
    stated = re.search(r"^#\s+\S+: ([\d.]+) GiB per chip", preset.read_text(), re.M)
    assert stated, f"{preset.name}: the header must state the compiled per-chip memory"
    assert abs(float(stated[1]) - plan["total_gib"]) < 0.1, (float(stated[1]), plan["total_gib"])
