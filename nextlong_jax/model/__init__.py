"""Llama model (`llama`), its architecture (`config`, free of jax), how it runs (`runtime`) and rotary
embeddings (`rope`)."""
