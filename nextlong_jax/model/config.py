"""Model configuration: a typed, hashable mirror of a Hugging Face Llama `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from nextlong_jax.dtypes import DTYPES
from nextlong_jax.model.attention import RESIDUAL_NAMES, Backend, Blocks
from nextlong_jax.model.attention.backends import parse as parse_backend

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
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


# config.json keys read as-is; rope keys are parsed separately, and the rest (hidden_act, biases, torch
# dtype, ...) are either validated by the converter or only matter to torch.
_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
              "bos_token_id", "eos_token_id")


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` as a hashable value; fields unused by a type keep their defaults."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r} (supported: {ROPE_TYPES})")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        # Old checkpoints say "type", new ones "rope_type"; transformers >= 5 also folds rope_theta in.
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in fields})

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "llama3":
            return dataclasses.asdict(self)
        return {"rope_type": self.rope_type, "factor": self.factor}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Training-side knobs below: not part of the HF config.
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
    # Residual-branch dropout (attention and MLP outputs), only where the caller passes a "dropout" rng,
    # i.e. in training; the NExtLong recipe, like Llama pre-training, uses none.
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))
        object.__setattr__(self, "attention_backend", parse_backend(self.attention_backend))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
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

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6 x matmul params, plus causal attention scores), the usual MFU numerator."""
        e, h, kv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = e * (h + 2 * kv) * d + h * d * e + 3 * e * self.intermediate_size
        dense = self.num_hidden_layers * per_layer + e * self.vocab_size
        attention = self.num_hidden_layers * 2 * h * d * seq_len  # QK^T and PV, halved by causality, x2 multiply-add
        return 6.0 * dense + 3.0 * attention

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def for_inference(self) -> LlamaConfig:
        """How evaluation and decoding run it: nothing is differentiated, so no activation is recomputed
        or saved, and the layers run as a scan whatever training chose: the same parameters, one layer
        compiled instead of all (SmolLM2-135M on a CPU: 4 s instead of 10 s to compile a forward pass, at
        the same speed), and a decode step 5x faster (56 vs 292 ms; XLA slices each layer's cache in
        place in a scan)."""
        return self.replace(remat_policy=NO_REMAT, scan_layers=True)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Reads a Llama `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        # transformers' precedence: rope_scaling over rope_parameters, a nested rope_theta over the top-level one
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        theta = (rope or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        kwargs = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
        kwargs.update(rope_theta=float(theta), rope_scaling=RopeScaling.from_hf(rope))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers 4.45+ and 5.x both load as LlamaForCausalLM."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": self.param_dtype,
        }
