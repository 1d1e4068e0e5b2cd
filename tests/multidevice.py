"""Run a test module's child part on 8 virtual CPU devices.

XLA reads the device count once, when jax starts, and the pytest process must keep its single
device for the other tests; so sharded tests run their body in a child Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The environment of a child process with 8 CPU devices.
ENV_8_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
                 "PYTHONPATH": str(ROOT)}


def run_on_8_devices(script: str, *args: str) -> str:
    """stdout of `python script *args` with 8 CPU devices; fails the calling test on error."""
    proc = subprocess.run([sys.executable, script, *args], env=ENV_8_DEVICES, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
