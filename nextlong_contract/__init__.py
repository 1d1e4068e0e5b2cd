"""What synthesis and training share, and nothing else: the data contract (`schema`), the one reader of
a synthesis output (`reader`), the target tokenizer's loader (`tokenizer`) and URL locations (`urls`).

`synth` (the writer) and `nextlong_jax` (the trainer) import this package and never each other;
`nextlong_eval` sits above both. None of these modules imports TensorFlow or JAX at import time.
"""
