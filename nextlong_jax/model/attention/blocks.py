"""Attention tile sizes, shared by the backends and the model config."""

from __future__ import annotations

from typing import NamedTuple


class Blocks(NamedTuple):
    """Forward query and key blocks, and the backward kernels' (blockwise and ring use only `q`).

    fused_bwd: kernels that can compute dq inside the dK/dV pass (splash) do so. Splash then writes
    a partial dq per key block, L / kv_bwd times the size of q: fine short, ruinous long.
    """

    q: int = 512
    kv: int = 512
    q_bwd: int = 512
    kv_bwd: int = 512
    fused_bwd: bool = False
