"""Compile-only plans: topology names, chips as they report themselves, and a reduced Llama (2 layers,
head_dim 128, GQA) compiled for a TPU v5p slice and an 8-GPU H100 host with the platform's attention
kernel in the compiled program (no silent fallback), memory reported, and the CLI's verdicts.

Compiling needs jax started on the CPU with the accelerator plugins loaded, so those parts run in
child interpreters (`JAX_PLATFORMS=cpu`), as the CLI's --compile-only arranges for itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from multidevice import ROOT
from nextlong_jax.hardware import CHIPS_BY_NAME
from nextlong_jax.topology import TopologyError, parse_topology

pytestmark = pytest.mark.compile

# Two 512-token attention blocks per row (one per shard when the length is split in two): the kernels'
# real tiling at the smallest shapes, since libtpu's compile time grows with them.
REDUCED = ["data.seq_len=1024", "model.hidden_size=256", "model.num_attention_heads=4", "model.num_key_value_heads=2",
           "model.head_dim=128", "model.vocab_size=512", "model.intermediate_size=256",
           "model.max_position_embeddings=1024", "runtime.attention_block_size=512", "runtime.logits_block_size=512",
           "runtime.dtype=bfloat16", "runtime.remat_policy=full", "runtime.scan_layers=true"]


@pytest.mark.parametrize("name,chip,grid,count", [
    ("v5p-64", "v5p", (2, 4, 4), 1), ("v4-128", "v4", (4, 4, 4), 1), ("v5e-256", "v5e", (16, 16), 1),
    ("v6e-64", "v6e", (8, 8), 1), ("v5p:4x4x2", "v5p", (4, 4, 2), 1), ("2xv5p-256", "v5p", (4, 4, 8), 2),
    ("h100-8", "h100", (8,), 1), ("4xH200-8", "h200", (8,), 4), ("v5p-8", "v5p", (2, 2, 1), 1),
    ("tpu7x-16", "tpu7x", (2, 2, 2), 1),
])
def test_topology_names(name, chip, grid, count):
    topology = parse_topology(name)
    assert (topology.chip.name, topology.grid, topology.count) == (chip, grid, count)
    assert topology.platform == ("gpu" if chip.startswith(("h", "a", "b")) else "tpu")


@pytest.mark.parametrize("bad,why", [("v5p-6", "power-of-two"), ("v5p-12", "power-of-two"), ("tpu-8", "accepted:"),
                                     ("v5e:2x2x2", "2 dimensions"), ("0xh100-8", "at least 1"), ("v4-7", "2 per chip")])
def test_bad_topology_names_say_what_is_accepted(bad, why):
    with pytest.raises(TopologyError, match=why):
        parse_topology(bad)


def test_hbm_is_the_published_decimal_figure():
    assert round(CHIPS_BY_NAME["v5p"].hbm_gib, 1) == 88.5  # 95 GB
    assert CHIPS_BY_NAME["h100"].hbm_bytes == 80e9 and CHIPS_BY_NAME["v5e"].hbm_bytes == 16e9


def _child(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def children(request):
    """The selected tests' child runs, all started at once, as many at a time as there are cores (a
    compile runs mostly on one thread); each test waits for its own."""
    runs = []
    for item in request.session.items:
        if item.module.__name__ == request.module.__name__:
            if item.originalname == "test_reduced_llama_compiles_with_the_platform_kernel":
                runs.append(("plans", item.callspec.params["target"]))
            elif item.originalname == "test_compile_only_devices_report_kinds_that_hardware_knows":
                runs.append(("kinds",))
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(runs), len(os.sched_getaffinity(0)))))
    yield {args: pool.submit(_child, *args) for args in sorted(runs, key=lambda args: args != ("plans", "tpu"))}
    pool.shutdown(cancel_futures=True)


def test_compile_only_devices_report_kinds_that_hardware_knows(children):
    assert "kinds ok" in children["kinds",].result()


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_reduced_llama_compiles_with_the_platform_kernel(target, children):
    assert f"{target} plans ok" in children["plans", target].result()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "nextlong_jax.train_cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def test_cli_plans_prints_json_and_refuses_what_does_not_fit():
    # fsdp over the 4 chips, the kernel left to `auto` (test_reduced_llama_compiles_with_the_platform_kernel
    # compiles the other TPU layouts).
    fits = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "v5p-8",
                "data.batch_size=4", *REDUCED, "data.document_lens=[512]")
    assert fits.returncode == 0, fits.stderr[-2000:]
    plan = json.loads(fits.stdout.strip().splitlines()[-1])
    # A packed source's rows (2 documents of 512 tokens per 1024-token row) take a program of their own,
    # planned beside the whole rows': the same kernel, less attention work.
    (slotted,) = plan.pop("slot_programs")
    assert plan["slots"] == 1 and slotted["slots"] == 2 and slotted["fits"] and slotted["fingerprint"] != plan["fingerprint"]
    assert any("splash_mha_fwd" in k for k in slotted["attention_kernels"])
    assert slotted["model_tflops_per_step"] < plan["model_tflops_per_step"]
    assert "the step for rows of 2 documents in slots" in fits.stdout
    assert plan["fits"] and plan["devices"] == 4 and plan["chip"] == "v5p" and plan["attention_backend"] == "splash"
    assert plan["loss_loop_collectives"] == []  # the head gathered once, not per vocabulary block
    assert any("splash_mha_fwd" in k for k in plan["attention_kernels"])
    assert plan["attention_blocks"] == {"q": 512, "kv": 512, "q_bwd": 512, "kv_bwd": 512, "fused_bwd": False,
                                        "kv_compute": 512, "kv_bwd_compute": 512}  # what splash reads
    assert plan["total_gib"] > 0 and plan["hbm_gib"] == plan["budget_gib"] == 88.48 and plan["model_tflops_per_step"] > 0
    assert plan["compilers"]["jax"] == "0.10.2" and plan["compilers"]["libtpu"].startswith("0.0.42")
    # 2 x 1.05B embedding parameters in fp32 with two Adam moments: ~25 GB of state on one 16 GB chip.
    huge = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "v5e-1",
                "data.batch_size=1", "data.seq_len=128", "model.hidden_size=8192", "model.num_attention_heads=64",
                "model.num_key_value_heads=8", "model.intermediate_size=256", "model.num_hidden_layers=1",
                "model.tie_word_embeddings=false")
    assert huge.returncode == 1
    verdict = json.loads(huge.stdout.strip().splitlines()[-1])
    assert verdict["fits"] is False and verdict["chip"] == "v5e"
    # The TPU compiler itself refuses a program that overflows HBM; either way one line says why.
    assert re.match(r"nextlong-train: error: (needs \S+ GiB per chip|does not compile for v5e-1: .*HBM)",
                    huge.stderr.strip().splitlines()[-1])
    # cuDNN on a GPU takes packed documents only as an [L, L] mask: refused at training lengths.
    dense = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "h100-8",
                 "data.batch_size=8", "data.seq_len=32768", "model.max_position_embeddings=32768",
                 "runtime.attention_backend=cudnn")
    assert dense.returncode == 1 and "cudnn builds an [L, L] mask" in dense.stderr and "use auto" in dense.stderr
    # A kernel the target cannot run is refused in one line, not compiled as something slower.
    wrong = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "h100-8",
                 "data.batch_size=8", *REDUCED, "runtime.attention_backend=splash")
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1].startswith(
        "nextlong-train: error: runtime.attention_backend=splash runs on tpu, but this program is compiled for gpu")
    unnamed = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only")
    assert unnamed.returncode == 1 and "names no mesh.topology: pass --topology" in unnamed.stderr
    bad = _cli("--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "v9-8")
    assert bad.returncode == 1 and "unknown topology 'v9-8'" in bad.stderr


def test_preset_compiler_flags_reach_the_compile():
    """`xla.tpu` flags go to libtpu as the step's compiler options: one it does not know fails the
    compile in one line, one it knows is recorded in the plan; another platform's flags are not passed."""
    small = ["--config", "configs/train/tiny-cpu.yaml", "--compile-only", "--topology", "v5p-8", "data.batch_size=4",
             *REDUCED, "data.seq_len=512", "model.num_hidden_layers=1"]
    bogus = _cli(*small, "xla.tpu.xla_tpu_no_such_flag=1")
    assert bogus.returncode == 1 and "No such compile option: 'xla_tpu_no_such_flag'" in bogus.stderr.splitlines()[-1]
    known = _cli(*small, "xla.tpu.xla_tpu_scoped_vmem_limit_kib=65536", "xla.gpu.xla_gpu_no_such_flag=1")
    assert known.returncode == 0, known.stderr[-2000:]
    plan = json.loads(known.stdout.strip().splitlines()[-1])
    assert plan["xla_flags"] == {"xla_tpu_scoped_vmem_limit_kib": 65536}
    assert "compiler flags: xla_tpu_scoped_vmem_limit_kib=65536" in known.stdout


def test_fingerprint_keys_every_input_of_the_compile(monkeypatch):
    """The plan cache's key changes with the program, the options, the device order, the topology,
    the environment's compiler flags and the compilers' versions, and with nothing else."""
    import jax
    import jax.numpy as jnp

    from nextlong_jax import compile_only

    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(4))
    v5p = parse_topology("v5p-8")
    key = compile_only.fingerprint(lowered, {}, [0, 1, 2, 3], v5p)
    assert key == compile_only.fingerprint(jax.jit(lambda x: x * 2).lower(jnp.ones(4)), {}, [0, 1, 2, 3], v5p)
    others = [compile_only.fingerprint(jax.jit(lambda x: x * 3).lower(jnp.ones(4)), {}, [0, 1, 2, 3], v5p),
              compile_only.fingerprint(lowered, {"xla_tpu_scoped_vmem_limit_kib": 65536}, [0, 1, 2, 3], v5p),
              compile_only.fingerprint(lowered, {}, [1, 0, 2, 3], v5p),
              compile_only.fingerprint(lowered, {}, [0, 1, 2, 3], parse_topology("v5p:2x2x1"))]
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_scoped_vmem_limit_kib=65536")
    others.append(compile_only.fingerprint(lowered, {}, [0, 1, 2, 3], v5p))
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    monkeypatch.setattr(compile_only, "installed", lambda: {"jax": "0.10.2", "libtpu": "0.0.43"})
    others.append(compile_only.fingerprint(lowered, {}, [0, 1, 2, 3], v5p))
    assert len({key, *others}) == len(others) + 1


def _kinds() -> None:
    from nextlong_jax.hardware import chip_of
    from nextlong_jax.topology import compile_only_devices

    for name in ("v4-8", "v5p-8", "v5e-4", "v6e-4", "tpu7x-8", "h100-8", "h200-8", "a100-8", "b200-8"):
        topology = parse_topology(name)
        devices = compile_only_devices(topology)
        assert len(devices) == topology.num_devices, name
        chip = chip_of(devices[0])
        assert chip is not None and chip.name == topology.chip.name, (name, devices[0].device_kind)
    two = compile_only_devices(parse_topology("2xv5p-8"))
    assert sorted({d.slice_index for d in two}) == [0, 1]
    print("kinds ok")


def _plans(target: str) -> None:
    import dataclasses
    import tempfile

    from nextlong_jax.compile_only import plan
    from nextlong_jax.hardware import GPU_MEMORY_FRACTION_ENV
    from nextlong_jax.topology import prepare_environment
    from nextlong_jax.train_config import load_config

    prepare_environment()
    cases = {  # (mesh overrides, backend asked for, backend that runs, a kernel that must be in the program)
        # Heads split over `tensor`: test_splash compiles the kernel so for a v5p, and the GPU cases the step.
        # (fsdp alone, with `auto`: test_cli_plans_prints_json_and_refuses_what_does_not_fit.)
        "tpu": [(["mesh.fsdp=2", "mesh.sequence=2"], "splash", "splash", "splash_mha_dq"),  # context parallel
                (["mesh.fsdp=2", "mesh.sequence=2"], "ring", "ring", None)],
        "gpu": [(["mesh.fsdp=8"], "auto", "pallas_gpu", "mha_forward"),
                (["mesh.fsdp=4", "mesh.tensor=2"], "pallas_gpu", "pallas_gpu", "mha_backward")],
    }[target]
    topology = parse_topology("v5p-8" if target == "tpu" else "h100-8")
    cache = Path(tempfile.mkdtemp())
    for i, (mesh, backend, runs, kernel) in enumerate(cases):
        config = load_config(ROOT / "configs/train/tiny-cpu.yaml",
                             [*REDUCED, *mesh, f"runtime.attention_backend={backend}", "data.batch_size=16",
                              "optimizer.grad_accum=2"])
        p = plan(config, topology, cache=cache)
        assert not p.cached
        if i == 0:
            first_config, first = config, p
        assert p.attention_backend == runs, p
        if kernel:
            assert any(kernel in k for k in p.attention_kernels), (mesh, p.attention_kernels)
        else:  # the pure-JAX ring: XLA's own ops, no kernel
            assert not p.attention_kernels, p.attention_kernels
        assert p.temp_gib > 0 and p.argument_gib > 0 and p.fits, p
        # The head is gathered once, not per vocabulary block; a vocabulary split over `tensor` adds up each
        # block's softmax statistics ([B, T], not the head) across its shards.
        assert p.loss_loop_collectives == (["all-reduce"] if "mesh.tensor=2" in mesh else []), p
        print(target, mesh, backend, p.attention_kernels, p.total_gib, flush=True)
    again = plan(first_config, topology, cache=cache)  # the first case again, from the cache its compile wrote
    if target == "tpu":  # the plan as compiled
        assert again.cached and dataclasses.replace(again, cached=False) == first, (again, first)
    else:  # judged against today's allocator share, not the one recorded with it
        os.environ[GPU_MEMORY_FRACTION_ENV] = "0.0001"
        tight = plan(first_config, topology, cache=cache)
        assert again.cached and again.fits and tight.cached and not tight.fits, (again, tight)
        assert tight.budget_gib < again.budget_gib == first.budget_gib and tight.total_gib == first.total_gib
    _loop_collectives_are_found(topology)
    print(f"{target} plans ok")


def _loop_collectives_are_found(topology) -> None:
    """What the loss once did (a gradient reduce-scattered at every block) is what `loop_collectives` reports."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nextlong_jax.compile_only import loop_collectives
    from nextlong_jax.model.loss import LOOP_SCOPE
    from nextlong_jax.topology import compile_only_devices

    mesh = jax.make_mesh((topology.num_devices,), ("fsdp",), devices=compile_only_devices(topology),
                         axis_types=(jax.sharding.AxisType.Auto,))

    def per_block_reduce(hs):  # hs [blocks, B, E], B sharded: each block's [E, E] sum is reduce-scattered
        def step(total, h):
            return jax.lax.with_sharding_constraint(total + jnp.einsum("be,bf->ef", h, h),
                                                    NamedSharding(mesh, P("fsdp"))), None
        with jax.named_scope(LOOP_SCOPE):
            return jax.lax.scan(step, jnp.zeros((256, 256)), hs)[0]

    blocks = jax.ShapeDtypeStruct((4, 64, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    with jax.set_mesh(mesh):
        program = jax.jit(per_block_reduce).lower(blocks).compile().as_text()
    found = loop_collectives(program, LOOP_SCOPE)
    assert found and set(found) <= {"all-reduce", "reduce-scatter", "all-gather"}, found
    assert loop_collectives(program, "no_such_scope") == []


if __name__ == "__main__":
    _kinds() if sys.argv[1] == "kinds" else _plans(sys.argv[2])


def test_extras_pin_the_compilers_the_plans_were_made_with():
    import tomllib

    from nextlong_jax.compilers import PLANNED_WITH, installed, runtime_mismatch

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for extra in ("tpu", "gpu", "aot"):
        for requirement in extras[extra]:
            name, _, version = requirement.partition("==")
            pins.setdefault(name.split("[")[0], set()).add(version.rstrip(".*"))
    for name, planned in PLANNED_WITH.items():
        if name != "jaxlib":  # jax pins its own jaxlib
            assert pins[name] == {planned}, (name, pins[name])
    # The test install is the plans' install: nothing to warn about on either platform.
    assert installed()["jax"] == PLANNED_WITH["jax"]
    assert runtime_mismatch("tpu") is None and runtime_mismatch("cuda") is None


def test_plans_assemble_with_the_pinned_cuda_12_ptxas(monkeypatch):
    """XLA takes the first ptxas on PATH: this machine's CUDA 13 toolkit would otherwise assemble the plans."""
    import shutil

    from nextlong_jax.compilers import PLANNED_WITH, PTXAS, put_planned_ptxas_first

    monkeypatch.setenv("PATH", f"/usr/local/cuda/bin{os.pathsep}{os.environ['PATH']}")
    ptxas = put_planned_ptxas_first()
    assert ptxas is not None and shutil.which("ptxas") == str(ptxas)
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    assert f"V{PLANNED_WITH[PTXAS]}" in version, version
    assert os.environ["PATH"].split(os.pathsep).count(str(ptxas.parent)) == 1
    put_planned_ptxas_first()  # again: still first, once
    assert os.environ["PATH"].split(os.pathsep).count(str(ptxas.parent)) == 1


def test_a_different_compiler_is_one_warning_line(monkeypatch):
    from nextlong_jax import compilers

    monkeypatch.setattr(compilers, "installed", lambda: {**dict.fromkeys(compilers.PLANNED_WITH, "0.10.2"),
                                                         "libtpu": "0.0.30", "jax-cuda12-plugin": None})
    tpu = compilers.runtime_mismatch("tpu")
    assert tpu.startswith("this run compiles with libtpu 0.0.30 (planned with 0.0.42)") and "\n" not in tpu
    assert "jax-cuda12-plugin missing" in compilers.runtime_mismatch("cuda")
    assert compilers.runtime_mismatch("cpu") is None


def test_gpu_plans_count_the_allocators_share_of_what_cuda_reports(monkeypatch):
    from nextlong_jax.hardware import GPU_MEMORY_FRACTION_ENV, claim_gpu_memory

    monkeypatch.delenv(GPU_MEMORY_FRACTION_ENV, raising=False)
    h100 = CHIPS_BY_NAME["h100"]
    assert round(h100.hbm_gib, 1) == 74.5 and round(h100.usable_bytes / 2**30, 1) == 79.1
    assert round(h100.budget_gib, 2) == round(0.90 * 79.11, 2)
    assert CHIPS_BY_NAME["v5p"].budget_gib == CHIPS_BY_NAME["v5p"].hbm_gib  # no allocator share on TPU
    claim_gpu_memory()
    assert os.environ[GPU_MEMORY_FRACTION_ENV] == "0.9"
    monkeypatch.setenv(GPU_MEMORY_FRACTION_ENV, "0.8")  # the user's choice stands, and the plan follows it
    claim_gpu_memory()
    assert os.environ[GPU_MEMORY_FRACTION_ENV] == "0.8" and round(h100.budget_gib, 1) == round(0.8 * 79.11, 1)
