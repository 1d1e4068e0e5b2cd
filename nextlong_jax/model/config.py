"""Model configuration: a typed, hashable mirror of a Hugging Face Llama `config.json`, the architecture
alone and free of jax; how the model runs is `runtime.Runtime`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

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
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6 x matmul params, plus causal attention scores), the usual MFU numerator."""
        e, h, kv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = e * (h + 2 * kv) * d + h * d * e + 3 * e * self.intermediate_size
        dense = self.num_hidden_layers * per_layer + e * self.vocab_size
        attention = self.num_hidden_layers * 2 * h * d * seq_len  # QK^T and PV, halved by causality, x2 multiply-add
        return 6.0 * dense + 3.0 * attention

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

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

    def to_hf_dict(self, torch_dtype: str) -> dict[str, Any]:
        """A `config.json` that transformers 4.45+ and 5.x both load as LlamaForCausalLM, of weights stored
        in `torch_dtype`."""
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
            "torch_dtype": torch_dtype,
        }
