"""How a model runs, apart from what it is (`config.LlamaConfig`): dtypes, the attention kernel and its
tiles, what a decoder layer keeps for the backward pass, the layer loop and the loss's vocabulary
blocks. The training config's `runtime:` section. A checkpoint's model is the architecture alone, so
evaluation and decoding run it under the runtime of the config they are given."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from nextlong_jax.dtypes import DTYPES
from nextlong_jax.model.attention import RESIDUAL_NAMES, Backend, Blocks
from nextlong_jax.model.attention.backends import parse as parse_backend

NO_REMAT = "none"  # every activation kept for the backward pass: nothing recomputed
# Checkpoint name of a decoder layer's input (llama.py names it): what `offload` moves to host memory.
LAYER_INPUT = "decoder_layer_input"
# Each other remat_policy: what jax.checkpoint keeps of a decoder layer for the backward pass.
REMAT_SAVES = {
    "full": None,  # nothing but the layer's inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The layer's attention residuals: the backward pass then re-runs the projections and the MLP
    # but not the attention forward (about [B, L, H, D] per layer more memory).
    "save_attention": jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES),
    # MaxText's offload: as save_attention, and each layer's input (the scan's carry, [B, L, E] per
    # layer, the bulk of what `full` keeps in HBM) moved to pinned host memory after the forward and
    # fetched back for the backward. jax 0.10.2 compiles it for TPU, GPU and CPU alike (plans show the
    # host share as the layer inputs leaving HBM).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(RESIDUAL_NAMES), names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}
REMAT_POLICIES = (NO_REMAT, *REMAT_SAVES)


@dataclass(frozen=True)
class Runtime:
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay in float32
    # `auto`, or a backend by name (`attention.backends`); the trainer resolves it for its platform.
    attention_backend: Backend = Backend.AUTO
    attention_allow_fallback: bool = False  # a named kernel the platform lacks runs `auto`'s choice
    attention_block_size: int = 512  # query block (the only block of blockwise and ring)
    attention_block_kv: int | None = None  # key/value block of the kernels; None: attention_block_size
    attention_block_q_bwd: int | None = None  # backward kernels' blocks; None: the forward ones
    attention_block_kv_bwd: int | None = None
    attention_block_kv_compute: int | None = None  # splash's block_kv_compute; None: the kv block
    attention_block_kv_bwd_compute: int | None = None  # splash's block_kv_dkv_compute; None: the kv_bwd block
    attention_fused_bwd: bool = False  # splash: dq inside the dK/dV kernel (short sequences only)
    remat_policy: str = "full"
    scan_layers: bool = True  # False unrolls the layer scan: same parameter layout, faster step, slower compile
    logits_block_size: int = 1024
    # The loss gathers the whole output head once per microbatch and reduces its gradient once: a whole
    # [E, V] head in the compute dtype and its float32 gradient on each device (3 GiB for Llama 3 8B).
    # False: XLA gathers it and reduce-scatters its gradient at every vocabulary block instead, for
    # chips where those gigabytes do not fit beside the step (32 GB v4).
    loss_gathers_head: bool = True

    def __post_init__(self):
        object.__setattr__(self, "attention_backend", parse_backend(self.attention_backend))
        for name, allowed in (("param_dtype", DTYPES), ("dtype", DTYPES),
                              ("remat_policy", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} not in {allowed}")

    @property
    def attention_blocks(self) -> Blocks:
        q = self.attention_block_size
        kv = self.attention_block_kv or q
        kv_bwd = self.attention_block_kv_bwd or kv
        return Blocks(q, kv, self.attention_block_q_bwd or q, kv_bwd, self.attention_fused_bwd,
                      self.attention_block_kv_compute or kv, self.attention_block_kv_bwd_compute or kv_bwd)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)

    def for_inference(self) -> Runtime:
        """How evaluation and decoding run it: nothing is differentiated, so no activation is recomputed
        or saved, and the layers run as a scan whatever training chose: the same parameters, one layer
        compiled instead of all (SmolLM2-135M on a CPU: 4 s instead of 10 s to compile a forward pass, at
        the same speed), and a decode step 5x faster (56 vs 292 ms; XLA slices each layer's cache in
        place in a scan)."""
        return self.replace(remat_policy=NO_REMAT, scan_layers=True)
