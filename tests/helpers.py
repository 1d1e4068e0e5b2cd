"""What several test modules build their inputs with: packed segment ids for the attention kernels,
small synthesis corpora with the command line that turns them into an output quickly, and
`nextlong-train` run in the test's own process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

# SmolLM2 at 1K-4K tokens in attention blocks of 512 rather than the tiny preset's 128 (sized for its 512-token
# rows): the same scores, a few times fewer kernel steps on a CPU (a 4K prefill: 14.1 s -> 9.8 s).
SMOLLM2_BLOCKS = "runtime.attention_block_size=512"

TOPICS = ("apple orchard harvest", "river boat current", "python list index", "violin string bow",
          "glacier ice snow", "market price trade", "rocket fuel orbit", "bread flour oven")


def packed_segments(b: int, length: int) -> np.ndarray:
    """int32 [b, length] segment ids as packed data has them: row 0 three documents and a padding tail
    (segment 0), the last row two documents and padding, rows between one document. Boundaries fall
    off the power-of-two block edges the kernels tile by."""
    seg = np.ones((b, length), np.int32)
    seg[0, length // 5 + 1:] = 2
    seg[0, 3 * length // 5 + 2:] = 3
    seg[0, length - length // 9 - 1:] = 0
    seg[-1, length // 2 + 3:] = 2
    seg[-1, length - length // 8 - 1:] = 0
    return seg


def write_corpus(path: Path, docs: int, seed: int = 0, paragraphs: int = 6, topics: tuple[str, ...] = TOPICS,
                 filler: tuple[str, ...] = ("the", "a", "of", "and")) -> Path:
    """JSONL of `docs` documents, each of `paragraphs` 40-word paragraphs drawn from its topic's words,
    `filler` and its own marker words: documents of one topic are similar, so negatives are found."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for d in range(docs):
            topic = topics[d % len(topics)].split()
            paras = [" ".join(rng.choice(topic + [*filler, f"w{d}", f"p{p}"], 40)) + "." for p in range(paragraphs)]
            f.write(json.dumps({"id": f"doc{d}", "text": "\n".join(paras)}) + "\n")
    return path


def synth_args(meta, out, *extra) -> list[str]:
    """`nextlong-synth` arguments for a quick run: hashing embedder, exact index, 1024-token sequences."""
    return ["--meta", str(meta), "--out", str(out), "--tokenizer", "llama3",
            "--embedder", "hashing", "--index", "faiss-flat", "--seq-len", "1024",
            "--chunk-tokens", "64", "--num-shards", "2", "--docs-per-block", "8", *extra]


def context_parallel_errors(attend, mesh, rng: np.random.Generator, b: int, length: int, heads: int, kv_heads: int,
                            head_dim: int, segments: np.ndarray, *, atol: float, grad_atol: float,
                            grad_rtol: float, name: str) -> list[float]:
    """Run `attend(q, k, v, segment_ids)` under `mesh` on zig-zag-ordered float32 inputs and check its
    output and dq/dk/dv against the unsharded reference in the original order; returns the max
    |error| of each. For the context-parallel kernels (the length sharded over `sequence`)."""
    import jax
    import jax.numpy as jnp

    from nextlong_jax import load_balance
    from nextlong_jax.model.attention.reference import reference_attention

    shards = mesh.shape["sequence"]
    q = jnp.asarray(rng.standard_normal((b, length, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray(segments)
    want, pullback = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg), q, k, v)
    zq, zk, zv, zseg, zct = (load_balance.zigzag(x, shards) for x in (q, k, v, seg, ct))

    @jax.jit
    def run(q, k, v, ct):
        out, kernel_pullback = jax.vjp(lambda q, k, v: attend(q, k, v, zseg), q, k, v)
        return out, kernel_pullback(ct)

    with jax.set_mesh(mesh):
        out, grads = run(zq, zk, zv, zct)
    assert len(out.sharding.device_set) == mesh.size, name
    got = [load_balance.unzigzag(x, shards) for x in (out, *grads)]
    errors = []
    for g, w, which in zip(got, (want, *pullback(ct)), ("out", "dq", "dk", "dv")):
        tolerance = dict(atol=atol) if which == "out" else dict(atol=grad_atol, rtol=grad_rtol)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tolerance, err_msg=f"{name} {which}")
        errors.append(float(jnp.abs(g - w).max()))
    return errors


def train_in_process(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """`nextlong-train argv` in this process (no child interpreter to start: 7 s less a run), its exit code,
    stdout and stderr as a child's would be; stderr must hold no traceback."""
    from nextlong_jax.train_cli import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(["nextlong-train", *argv], code, out, err)
