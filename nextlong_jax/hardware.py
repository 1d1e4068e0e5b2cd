"""Published peak matmul throughput of accelerators, the denominator of MFU."""

from __future__ import annotations

import jax

# Dense bf16 FLOP/s per chip as published, matched as substrings of `Device.device_kind`.
PUBLISHED_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12,
                       "TPU v4": 275e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


def published_bf16_peak(device: jax.Device) -> float | None:
    """FLOP/s for a known accelerator; None for CPUs and unknown chips."""
    return next((flops for name, flops in PUBLISHED_BF16_PEAK.items() if name in device.device_kind), None)
