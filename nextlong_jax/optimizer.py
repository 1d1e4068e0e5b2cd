"""AdamW with global-norm clipping and a warmup + decay schedule, from `OptimizerConfig`."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import optax

from nextlong_jax.train_config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.final_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, decay_norms_and_embeddings: bool) -> Any:
    """True where weight decay applies. Norm scales are stacked [layers, E], so rank cannot tell them apart."""
    def wants_decay(path, _):
        names = {getattr(k, "key", None) for k in path}
        return decay_norms_and_embeddings or not ({"scale", "embed_tokens"} & names)
    return jax.tree_util.tree_map_with_path(wants_decay, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def build_optimizer(cfg: OptimizerConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=partial(decay_mask, decay_norms_and_embeddings=cfg.decay_norms_and_embeddings))
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule
