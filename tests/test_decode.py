"""The KV-cache decoder: greedy tokens identical to transformers' `generate` (random models and
SmolLM2-135M-Instruct), the same tokens on 8 devices (fsdp x sequence, with and without tensor) as on
one, seeded sampling that keeps to top-k / top-p, every way a row stops, and one-line refusals."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlong_jax.decode import Decoder, DecodeError, Sampling, bucket, sample
from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.runtime import Runtime
from nextlong_jax.sharding import axis_rules, logical_shardings, make_mesh
from nextlong_jax.testing import hf_model, params_from_hf, tiny_hf_dict
from nextlong_jax.warm_start import hf_params

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# An even vocabulary, so that it shards over `tensor` on 8 devices.
MODELS = {"gqa-untied": dict(vocab_size=312), "tied-llama3-rope": dict(tie_word_embeddings=True,
                                                                       rope_scaling=LLAMA3_SCALING)}
PROMPT_LENGTHS = (1, 9, 70, 300)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    import torch

    with torch.no_grad():
        # The mask is given: inferred from a pad id, it would hide prompt tokens that happen to equal it.
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _decoder(hf_dict: dict, hf, mesh=None, backend: str = "blockwise", batch_size: int = 1) -> Decoder:
    config = LlamaConfig.from_hf_dict(dict(hf_dict, max_position_embeddings=1024))
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    params = params_from_hf(hf, config)
    model = Llama(config, Runtime(attention_backend=backend, attention_block_size=64))
    with jax.set_mesh(mesh), axis_rules():
        boxed = jax.eval_shape(model.init, jax.random.key(0), *(np.ones((1, 8), np.int32),) * 3)["params"]
        params = jax.device_put(params, logical_shardings(boxed, mesh))
    return Decoder(model, params, mesh, batch_size)


@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_greedy_tokens_equal_transformers_generate(overrides):
    hf_dict = tiny_hf_dict(**copy.deepcopy(overrides))
    hf = hf_model(hf_dict)
    prompts = _prompts(hf_dict["vocab_size"])
    # Two rows a batch: prompts of different lengths share one left-padded prefill.
    got = _decoder(hf_dict, hf, batch_size=2).generate(prompts, 12)
    for prompt, completion in zip(prompts, got):
        assert completion.tokens == _hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens"
        assert completion.finish == "length" and completion.text is None


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_on_smollm2(smollm2):
    import torch
    import transformers

    from nextlong_contract.tokenizer import load_tokenizer

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(smollm2))
    chat = transformers.AutoTokenizer.from_pretrained(smollm2)
    question = chat.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    essay = tokenizer.encode(" ".join(Path(ROOT / "README.md").read_text().split()[:900]))
    prompts = [question, essay[:500]]  # one batch, the question left-padded to the essay's length
    config = LlamaConfig.from_hf_dict(json.loads((smollm2 / "config.json").read_text()))
    runtime = Runtime(attention_backend="blockwise", attention_block_size=256)
    decoder = Decoder(Llama(config, runtime), hf_params(smollm2, config, runtime.jnp_param_dtype),
                      make_mesh(devices=jax.devices()[:1]), 2, tokenizer.decode)
    got = decoder.generate(prompts, 16, stop_ids=[2])
    assert "Paris" in got[0].text
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert completion.tokens == out[0, len(prompt):].tolist(), f"prompt of {len(prompt)} tokens"


def test_sampling_keeps_to_top_k_and_top_p_and_is_seeded():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.07, 0.03]] * 4000, np.float32))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(4000))

    def draws(**kw) -> np.ndarray:
        return np.bincount(np.asarray(sample(logits, keys, Sampling(**kw))), minlength=5) / len(logits)

    np.testing.assert_allclose(draws(temperature=1.0), [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.03)
    np.testing.assert_allclose(draws(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0, 0], atol=0.03)
    # 0.5 + 0.25 < 0.8: the third token is the one that crosses, and stays; the rest go.
    np.testing.assert_allclose(draws(temperature=1.0, top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0],
                               atol=0.03)
    assert draws(temperature=0.0, top_k=3)[0] == 1.0  # greedy ignores the rest
    cold = draws(temperature=0.25)
    assert cold[0] > 0.9  # p^4 renormalised: 0.5^4 / (0.5^4 + 0.25^4 + ...) = 0.94
    with pytest.raises(DecodeError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_rows_stop_at_eos_stop_strings_and_the_budget():
    hf_dict = tiny_hf_dict()
    decoder = _decoder(hf_dict, hf_model(hf_dict))
    prompts = _prompts(hf_dict["vocab_size"], (5, 40))
    free = decoder.generate(prompts, 10)
    eos = free[0].tokens[3]
    stopped = decoder.generate(prompts, 10, stop_ids=[eos])
    first = free[0].tokens.index(eos)
    assert stopped[0].tokens == free[0].tokens[:first + 1] and stopped[0].finish == "eos"
    assert stopped[1].tokens == free[1].tokens[:len(stopped[1].tokens)]
    texts = Decoder(decoder.model, decoder.params, decoder.mesh, 1, lambda ids: " ".join(f"t{i}" for i in ids))
    marker = f"t{free[1].tokens[4]}"
    cut = texts.generate(prompts[1:], 10, stop_strings=[marker])[0]
    assert cut.finish == "stop" and marker not in cut.text and len(cut.tokens) <= 5
    assert [len(c.tokens) for c in decoder.generate(prompts, 3)] == [3, 3]


def test_sampled_tokens_do_not_depend_on_the_batch():
    hf_dict = tiny_hf_dict()
    hf = hf_model(hf_dict)
    prompts = _prompts(hf_dict["vocab_size"], (35, 40, 60))  # one prompt bucket: one program per decoder
    warm = Sampling(temperature=1.0, top_k=20, seed=7)
    alone = _decoder(hf_dict, hf)
    one = [c.tokens for c in alone.generate(prompts, 8, sampling=warm)]
    three = [c.tokens for c in _decoder(hf_dict, hf, batch_size=3).generate(prompts, 8, sampling=warm)]
    other_seed = [c.tokens for c in alone.generate(prompts, 8, sampling=Sampling(1.0, 20, seed=8))]
    assert one == three and one != other_seed


def test_bad_prompts_are_refused_in_one_line():
    hf_dict = tiny_hf_dict()
    decoder = _decoder(hf_dict, hf_model(hf_dict))
    for prompts, new, match in (([[]], 4, "prompt 0 is empty"), ([[1, 2], [5, 311]], 4, "token id 311, outside"),
                                ([[1]], 0, "max_new_tokens")):
        with pytest.raises(DecodeError, match=match):
            decoder.generate(prompts, new)
    with pytest.raises(DecodeError, match="stop strings need"):
        decoder.generate([[1]], 2, stop_strings=["x"])
    with pytest.raises(DecodeError, match="multiple of the mesh's batch shards"):
        Decoder(decoder.model, decoder.params, decoder.mesh, 0)


def test_past_the_trained_positions_is_run_with_a_one_line_warning(caplog):
    hf_dict = tiny_hf_dict()
    decoder = _decoder(hf_dict, hf_model(hf_dict))  # max_position_embeddings 1024
    with caplog.at_level("WARNING"):
        (done,) = decoder.generate(_prompts(hf_dict["vocab_size"], (1020,)), 8)
    assert len(done.tokens) == 8
    (record,) = [r for r in caplog.records if "extrapolation" in r.getMessage()]
    assert "position 1028, past the 1024" in record.getMessage()


def test_prompt_buckets_fit_the_kernels_tiling():
    assert [bucket(n, 2, 512) for n in (1, 3, 64, 65, 1024, 1025, 3000)] == [2, 4, 64, 128, 1024, 2048, 3072]
    for n in range(1, 5000, 37):
        length = bucket(n, 8, 64)  # 4 sequence shards: the ring's chunks split into whole blocks
        chunk = length // 4
        assert length >= n and length % 8 == 0 and chunk % min(64, chunk // 2) == 0


@pytest.mark.multiprocess
def test_sharded_decoding_equals_one_device():
    from multidevice import run_on_8_devices

    hf_dict = tiny_hf_dict(**MODELS["gqa-untied"])
    hf = hf_model(hf_dict)
    prompts = _prompts(hf_dict["vocab_size"], (5, 37, 50, 60))  # one 64-token bucket on both meshes
    one = _decoder(hf_dict, hf)
    want = {"greedy": [c.tokens for c in one.generate(prompts, 16)],
            "sampled": [c.tokens for c in one.generate(prompts, 16, sampling=Sampling(0.8, 50, 0.9, seed=3))]}
    got = json.loads(run_on_8_devices(__file__, json.dumps(prompts)).strip().splitlines()[-1])
    assert got["fsdp2-tensor2-sequence2"]["sampled"] == want["sampled"]
    for mesh in ("fsdp2-sequence4", "fsdp2-tensor2-sequence2"):
        assert got[mesh]["greedy"] == want["greedy"], mesh
        # The prompt's cache stays sharded: the decode step gathers no cache-sized array.
        assert got[mesh]["gathered_cache"] == [], mesh


def _child(prompts: str) -> None:
    prompts = json.loads(prompts)
    hf_dict = tiny_hf_dict(**MODELS["gqa-untied"])
    hf = hf_model(hf_dict)
    out = {}
    for name, shape in (("fsdp2-sequence4", dict(fsdp=2, sequence=4)),
                        ("fsdp2-tensor2-sequence2", dict(fsdp=2, tensor=2, sequence=2))):
        decoder = _decoder(hf_dict, hf, make_mesh(**shape), backend="ring", batch_size=2)
        out[name] = {"greedy": [c.tokens for c in decoder.generate(prompts, 16)],
                     "gathered_cache": _gathered_cache(decoder)}
        if shape.get("tensor"):  # sampling's two programs compiled on one mesh only, the one with every axis
            out[name]["sampled"] = [c.tokens for c in decoder.generate(prompts, 16,
                                                                        sampling=Sampling(0.8, 50, 0.9, seed=3))]
    print(json.dumps(out))


def _gathered_cache(decoder: Decoder) -> list[str]:
    """The all-gathers in the compiled decode step of a 64-token prompt whose result is cache-shaped."""
    length = 64
    cache_like = [np.zeros((2, 2, 2, n, 16), np.float32) for n in (length, length, 16, 16)]  # [layers, B, K, T, D]
    from nextlong_jax.model.attention.cached import LayerCache

    with jax.set_mesh(decoder.mesh), axis_rules():
        cache = jax.device_put(LayerCache(*cache_like), decoder._cache_shardings)
        seen = jax.device_put(np.ones((2, length), bool), decoder._sharding(("batch", "length")))
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(2))
        compiled = decoder._step_fn.lower(decoder.params, cache, seen, np.zeros(2, np.int32), np.zeros(2, np.int32),
                                          np.int32(0), keys, sampling=Sampling()).compile().as_text()
    return [line.strip() for line in compiled.splitlines()
            if "all-gather(" in line and re.search(rf"\[\d+,\d+,\d+,{length},\d+\]", line.split("=")[1])]


@pytest.mark.compile
@pytest.mark.parametrize("topology", ["v5p-8", "h100-8"])
def test_decoding_compiles_for_accelerators_with_their_kernels(topology):
    """Prefill (the training kernel: splash on a TPU, Triton on a GPU, over a sequence-sharded prompt) and
    the decode step compile for a TPU slice and a GPU host, on this CPU."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5p-8",
           "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "compile", topology], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"{topology} decode compiles" in proc.stdout, proc.stdout


def _child_compile(topology_name: str) -> None:
    from nextlong_jax.compile_only import COMPILE_ONLY_GPU_FLAGS, kernel_names
    from nextlong_jax.model.attention import resolve
    from nextlong_jax.model.attention.cached import LayerCache
    from nextlong_jax.topology import compile_only_devices, parse_topology, prepare_environment

    prepare_environment()
    topology = parse_topology(topology_name)
    mesh = make_mesh(fsdp=-1, sequence=2, devices=compile_only_devices(topology))
    backend = resolve("auto", topology.platform, sequence_shards=2)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    model = Llama(config, Runtime(dtype="bfloat16", attention_backend=backend, attention_block_size=128))
    ids = np.ones((1, 8), np.int32)
    with jax.set_mesh(mesh), axis_rules():
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids))["params"]
        shardings = logical_shardings(boxed, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype, sharding=s), boxed,
                          shardings, is_leaf=lambda x: hasattr(x, "value"))
    rows, length, tail = mesh.shape["fsdp"], 2048, 16
    decoder = Decoder(model, params, mesh, rows)
    shaped = lambda shape, dtype, axes: jax.ShapeDtypeStruct(shape, dtype, sharding=decoder._sharding(axes))
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(rows)))
    keys = shaped(keys.shape, keys.dtype, ("batch",))
    options = COMPILE_ONLY_GPU_FLAGS if topology.platform == "gpu" else {}
    features = {k: shaped((rows, length), np.int32, ("batch", "length"))
                for k in ("input_ids", "positions", "segment_ids")}
    with jax.set_mesh(mesh), axis_rules():
        prefill = decoder._prefill_fn.lower(decoder.params, features, keys, last=length - 1, tail=tail,
                                            sampling=Sampling()).compile(options)
        kv = (config.num_hidden_layers, rows, config.num_key_value_heads, None, config.head_dim)
        cache = LayerCache(*(jax.ShapeDtypeStruct(kv[:3] + (n,) + kv[4:], jnp.bfloat16, sharding=sh)
                             for n, sh in zip((length, length, tail, tail), decoder._cache_shardings)))
        step = decoder._step_fn.lower(decoder.params, cache, shaped((rows, length), bool, ("batch", "length")),
                                      shaped((rows,), np.int32, ("batch",)), shaped((rows,), np.int32, ("batch",)),
                                      jax.ShapeDtypeStruct((), np.int32), keys, sampling=Sampling()).compile(options)
    kernels = kernel_names(prefill.as_text())
    assert kernels, f"no attention kernel in the {topology_name} prefill"
    print(topology_name, backend, "prefill kernels:", ", ".join(kernels), "; step", step.memory_analysis() is not None)
    print(f"{topology_name} decode compiles")


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        _child_compile(sys.argv[2])
    else:
        _child(*sys.argv[1:])


@pytest.mark.slow
def test_generate_cli_answers_chat_prompts_and_writes_jsonl(smollm2, tmp_path, capsys, monkeypatch):
    from nextlong_eval.cli import main

    monkeypatch.chdir(ROOT)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "What is the capital of France?"}) + "\n\n"
                       + json.dumps({"id": "b", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}) + "\n")
    out = tmp_path / "completions.jsonl"
    common = ["--hf", str(smollm2), "--config", "configs/train/tiny-cpu.yaml", "--max-new-tokens", "24"]
    assert main(["generate", *common, "--chat-template", "--prompts", str(prompts), "--out", str(out)]) == 0
    assert "2 completions" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["finish"] == "eos" for r in rows)
    assert "Paris" in rows[0]["completion"] and "<|im_end|>" not in rows[0]["completion"]
    prompts.write_text('{"text": "no prompt field"}\n')
    assert main(["generate", *common, "--prompts", str(prompts)]) == 1
    err = capsys.readouterr().err
    assert 'prompts.jsonl:1: needs a "prompt" string' in err and len(err.strip().splitlines()) == 1
