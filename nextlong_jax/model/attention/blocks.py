"""Attention tile sizes, shared by the backends and the runtime config."""

from __future__ import annotations

from typing import NamedTuple


class Blocks(NamedTuple):
    """Forward query and key blocks, and the backward kernels' (blockwise and ring use only `q`).

    fused_bwd: kernels that can compute dq inside the dK/dV pass (splash) do so. Splash then writes
    a partial dq per key block, L / kv_bwd times the size of q: fine short, ruinous long.

    kv_compute / kv_bwd_compute (splash's block_kv_compute and block_kv_dkv_compute): the key
    sub-block each step of the forward / dK-dV kernel computes on, inside the key block it fetches
    (`kv` / `kv_bwd`) from HBM. Large fetched blocks with a smaller compute block (MaxText's long-
    context setting: 2048 fetched, 512 computed) keep fewer, larger DMAs without growing the
    [q, kv_compute] score tile in VMEM. None: the fetched block.
    """

    q: int = 512
    kv: int = 512
    q_bwd: int = 512
    kv_bwd: int = 512
    fused_bwd: bool = False
    kv_compute: int | None = None
    kv_bwd_compute: int | None = None
