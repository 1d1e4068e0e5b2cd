"""JAX/Flax Llama training for long-context continued pre-training."""
