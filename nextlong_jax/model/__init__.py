"""Llama model, its configuration and rotary embeddings."""

from nextlong_jax.model.config import LlamaConfig, RopeScaling
from nextlong_jax.model.llama import Llama

__all__ = ["Llama", "LlamaConfig", "RopeScaling"]
