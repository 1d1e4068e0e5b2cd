"""Hugging Face Llama directory <-> orbax checkpoint, tensor by tensor.

Orbax layout (also what a training step directory holds): `CKPT/params` (PyTree of the model's
params, stacked layers) and `CKPT/config` (the model's HF `config.json` dict). HF side: `config.json`,
`generation_config.json`, `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`.
Reading uses safetensors' lazy `safe_open`, writing goes one shard at a time; host memory peaks at
one copy of the params plus one shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy API needs)
import numpy as np

from nextlong_jax.hf_weights import WeightMismatch, check_params, hf_shapes, hf_to_params, params_to_hf
from nextlong_jax.model.config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")
# Beside a run's checkpoint steps (RUN/checkpoints/tokenizer): the tokenizer of the model it started
# from, which an export of any of its steps carries.
RUN_TOKENIZER = "tokenizer"


class ConversionError(Exception):
    """A user-facing problem with the inputs; the CLI prints it as one line."""


def read_hf_config(hf_dir: Path) -> LlamaConfig:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}")
    hf = json.loads(path.read_text())
    arch = hf.get("architectures") or [hf.get("model_type")]
    if hf.get("model_type") != "llama" or "LlamaForCausalLM" not in arch:
        raise ConversionError(f"unsupported architecture {arch} (model_type={hf.get('model_type')!r}); "
                              "only LlamaForCausalLM converts")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"unsupported Llama variant: {flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"unsupported hidden_act {hf['hidden_act']!r}")
    try:
        return LlamaConfig.from_hf_dict(hf)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"bad config.json in {hf_dir}: {e}") from None


def _hf_weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index json or a single unsharded file."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise ConversionError(f"{index.name} lists {f.name}, which is missing")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise ConversionError(f"no model.safetensors(.index.json) in {hf_dir} (only safetensors checkpoints convert)")


def read_hf_params(hf_dir: Path, config: LlamaConfig) -> dict[str, Any]:
    from safetensors import safe_open

    files = _hf_weight_files(hf_dir)
    missing = sorted(set(hf_shapes(config)) - set(files))
    if missing:
        raise ConversionError(f"checkpoint lacks tensor {missing[0]} ({len(missing)} missing in all)")
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def get(name: str) -> np.ndarray:
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
            return handles[path].get_tensor(name)

        try:
            return hf_to_params(get, config)
        except WeightMismatch as e:
            raise ConversionError(str(e)) from None


def _checkpointer():
    import orbax.checkpoint as ocp

    handlers = dict(params=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def save_checkpoint(ckpt_dir: Path, config: LlamaConfig, params: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    if ckpt_dir.exists():
        raise ConversionError(f"{ckpt_dir} already exists")
    stored = config.to_hf_dict(str(params["embed_tokens"].dtype))
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(params), config=ocp.args.JsonSave(stored))
    _checkpointer().save(ckpt_dir.resolve(), args)


def load_checkpoint(ckpt_dir: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """(config, params as host numpy arrays in their stored dtype)."""
    import orbax.checkpoint as ocp

    if not (ckpt_dir / "params").is_dir() or not (ckpt_dir / "config").is_dir():
        raise ConversionError(f"{ckpt_dir} is not a model checkpoint (needs params/ and config/)")
    ckpt_dir = ckpt_dir.resolve()
    tree = _checkpointer().metadata(ckpt_dir).item_metadata["params"].tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = _checkpointer().restore(ckpt_dir, ocp.args.Composite(
        params=ocp.args.PyTreeRestore(restore_args=restore_args), config=ocp.args.JsonRestore()))
    config = LlamaConfig.from_hf_dict(restored["config"])
    try:
        check_params(restored["params"], config)
    except WeightMismatch as e:
        raise ConversionError(str(e)) from None
    return config, restored["params"]


def hf_to_orbax(hf_dir: Path, ckpt_dir: Path) -> tuple[LlamaConfig, str]:
    """(the architecture, the dtype its parameters are stored in)."""
    config = read_hf_config(hf_dir)
    params = read_hf_params(hf_dir, config)
    save_checkpoint(ckpt_dir, config, params)
    return config, str(params["embed_tokens"].dtype)


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_hf(out_dir: Path, config: LlamaConfig, params: dict[str, Any], *, dtype: str | None = None,
             max_shard_bytes: int = 5 * 2**30, tokenizer: Path | None = None) -> None:
    from safetensors.numpy import save_file

    target = np.dtype(dtype) if dtype else np.asarray(params["embed_tokens"]).dtype
    if tokenizer is not None and not tokenizer.exists():
        raise ConversionError(f"tokenizer path {tokenizer} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {name: math.prod(shape) * target.itemsize for name, shape in hf_shapes(config).items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    tensors = params_to_hf(params, config)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in names:
            got, tensor = next(tensors)
            assert got == name  # plan and generator both follow hf_shapes order
            shard[name] = tensor.astype(target, copy=False)
            weight_map[name] = file
        save_file(shard, out_dir / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = config.to_hf_dict(target.name)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": hf_config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)


def copy_tokenizer(src: Path, out_dir: Path) -> None:
    """The tokenizer files of directory `src` (or the single file `src`) into `out_dir`."""
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        raise ConversionError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...) in {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, out_dir / f.name)


def model_tokenizer(hf_dir: Path | None = None, ckpt_dir: Path | None = None) -> Path | None:
    """The directory of a model's tokenizer: an HF directory's own, or for a checkpoint step
    (RUN/checkpoints/STEP) the one its run keeps beside its steps; None where neither is given or
    there is no tokenizer.json (a model converted with hf-to-orbax, a run started from scratch)."""
    where = hf_dir or (ckpt_dir and ckpt_dir.parent / RUN_TOKENIZER)
    return where if where and (where / "tokenizer.json").is_file() else None


def orbax_to_hf(ckpt_dir: Path, out_dir: Path, **write_kwargs: Any) -> LlamaConfig:
    config, params = load_checkpoint(ckpt_dir)
    write_hf(out_dir, config, params, **write_kwargs)
    return config


def verify(hf_dir: Path, ckpt_dir: Path, *, seq_len: int = 64, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(max |logit difference|, mean KL(hf || ours) per token) on the same random tokens, in float32."""
    import torch
    import transformers

    from nextlong_jax.model.attention import Backend
    from nextlong_jax.model.llama import Llama
    from nextlong_jax.model.runtime import Runtime

    config, params = load_checkpoint(ckpt_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"no config.json in {hf_dir}")
    # Parity is about the weights, not the kernel: pure-JAX attention on whatever this host is.
    runtime = Runtime(param_dtype="float32", dtype="float32", attention_backend=Backend.BLOCKWISE)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len))
    positions = np.broadcast_to(np.arange(seq_len), ids.shape)
    ours = np.asarray(jax.jit(Llama(config, runtime).apply)({"params": params}, ids, positions, np.ones_like(ids)))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.float().numpy()
    log_p, log_q = _log_softmax(theirs), _log_softmax(ours)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return float(np.max(np.abs(ours - theirs))), kl


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
