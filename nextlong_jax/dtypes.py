"""The floating-point dtypes, by name, that models are stored, computed and exported in.

Apart from `nextlong_jax.model` so that command lines list them without importing jax.
"""

DTYPES = ("float32", "bfloat16", "float16")
