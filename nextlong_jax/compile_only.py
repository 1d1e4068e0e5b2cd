"""Plan a run without its hardware: compile the full train step for a named TPU slice or GPU host.

XLA compiles for compile-only devices (`nextlong_jax.topology`) exactly as it would on the chips,
so the program's per-chip memory, and which attention kernel it runs, are the real ones; only the
timing is missing. MaxText's train_compile.py is the same idea.

An 8B step takes minutes to compile for a TPU slice, and the answer is a function of what XLA is
given. A plan cache (`--plan-cache DIR`) keys each plan by the sha256 of exactly that: the lowered
program, the compiler options and environment flags, the devices and the compilers' versions. A
re-plan of an unchanged step then costs its lowering (seconds); any change to the model, the
config's shapes or kernels, the flags or a compiler version is a new key, compiled afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import jax

from nextlong_jax.compilers import installed
from nextlong_jax.model.attention.backends import BACKENDS
from nextlong_jax.model.loss import LOOP_SCOPE
from nextlong_jax.sharding import axis_rules
from nextlong_jax.topology import Topology, compile_only_devices
from nextlong_jax.train_config import Config
from nextlong_jax.train_setup import abstract_batch, abstract_state, build, build_mesh, jit_step, rows_named

GIB = 2**30
# XLA asks the CUDA runtime, at compile time, how much scratch CUB's radix sort needs; a compile-only
# host has no CUDA libraries, so plans sort with XLA's own kernel (the Triton attention's segment
# sort over 32K+ keys is the one such sort in a step). A run on the GPUs keeps CUB.
COMPILE_ONLY_GPU_FLAGS = {"xla_gpu_enable_cub_radix_sort": False}


@dataclasses.dataclass(frozen=True)
class Plan:
    topology: str
    chip: str
    devices: int
    mesh: dict[str, int]
    attention_backend: str  # as resolved for the target's platform
    attention_kernels: list[str]  # custom-call kernels in the compiled program; empty: XLA's own ops
    attention_blocks: dict[str, int | bool]  # the tiles that backend runs (`backends.Spec.block_fields`)
    argument_gib: float  # per chip: parameters, optimizer state and batch
    temp_gib: float
    output_gib: float
    alias_gib: float  # outputs written over donated arguments (the state), counted once
    total_gib: float
    hbm_gib: float  # the chip's published HBM
    budget_gib: float  # what a run may use per chip (GPU: jax's allocator share of what CUDA reports)
    fits: bool  # total_gib <= budget_gib
    model_tflops_per_step: float
    compile_seconds: float
    xla_flags: dict[str, str | int | bool]  # the config's compiler options for this platform (`Config.xla`)
    host_gib: float  # per chip, in pinned host memory (remat_policy offload's layer inputs), not in total_gib
    compilers: dict[str, str | None]  # versions of jax, jaxlib, libtpu and the CUDA plugin that compiled it
    fingerprint: str  # sha256 of everything the compile depends on (`fingerprint`): the plan cache's key
    cached: bool = False  # read from a plan cache: compiled earlier from the same fingerprint
    slots: int = 1  # the program for rows of this many documents in slots (`train_setup.jit_step`); 1: whole rows
    # Collectives inside the loss's loop over vocabulary blocks (`loop_collectives`); None: not read
    loss_loop_collectives: list[str] | None = None

    def summary(self) -> str:
        kernels = ", ".join(self.attention_kernels) or "none (XLA ops)"
        return "\n".join([
            f"topology {self.topology}: {self.devices} x {self.chip}, mesh {self.mesh}; the step for "
            f"{rows_named(self.slots)}",
            f"attention {self.attention_backend} (blocks {self.attention_blocks}); kernels in the program: {kernels}",
            f"per chip: arguments {self.argument_gib:.2f} GiB + temporaries {self.temp_gib:.2f} GiB + outputs "
            f"{self.output_gib:.2f} GiB - aliased {self.alias_gib:.2f} GiB = {self.total_gib:.2f} GiB of "
            f"{self.budget_gib:.1f} GiB usable ({self.hbm_gib:.1f} GiB HBM published): "
            f"{'fits' if self.fits else 'DOES NOT FIT'}",
            f"model {self.model_tflops_per_step:.1f} TFLOP per step; compiled in {self.compile_seconds:.0f} s"
            + (f" (cached plan {self.fingerprint[:12]})" if self.cached else ""),
            f"compiler flags: {', '.join(f'{k}={v}' for k, v in self.xla_flags.items()) or 'none'}; "
            f"pinned host memory {self.host_gib:.2f} GiB per chip; collectives inside the loss's vocabulary loop: "
            f"{'not read' if self.loss_loop_collectives is None else ', '.join(self.loss_loop_collectives) or 'none'}",
        ])


def kernel_names(hlo_text: str) -> list[str]:
    """Custom-call kernels of a compiled program (Mosaic on TPU, Triton and cuDNN on GPU) by name."""
    names = set()
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if not target or not re.search(r"tpu_custom_call|triton|cudnn", target[1]):
            continue
        # Triton calls carry the kernel's name in their backend config; Mosaic calls are named after it.
        name = (re.search(r'\bname\s*=\s*\\?"([^"\\]+)', line.partition("backend_config=")[2])
                or re.match(r"\s*%?([\w-]+?)(?:\.\d+)?\s*=", line))
        names.add(f"{target[1]}:{name[1]}" if name else target[1])
    return sorted(names)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?([%\w.\-, ]+)\}?")
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")


def loop_collectives(hlo_text: str, scope: str) -> list[str]:
    """Collectives (all-gather, reduce-scatter, ...) serving the ops of the named scope `scope` that a
    compiled program runs inside the body of a while loop made under that scope, counting what the body
    calls (fusions, nested loops). Those whose op_name names other ops, which the scheduler places there
    to overlap them with the loop (the next layer's weight all-gathers under libtpu's async collective
    fusion), are not the loop's own."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        if current is None and (header := _COMPUTATION.match(line)):
            current = computations.setdefault(header[1], [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    pending = [re.search(r"body=%?([\w.-]+)", line)[1] for lines in computations.values() for line in lines
               if " while(" in line and scope in line.partition("metadata=")[2]]
    seen, found = set(), set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            origin = re.search(r'op_name="([^"]*)"', line)  # the partitioner leaves some of its collectives none
            if not origin or scope in origin[1]:
                found.update(m[1] for m in _COLLECTIVE.finditer(line))
            for called in _CALLED.findall(line):
                pending.extend(c.strip().lstrip("%") for c in called.split(","))
    return sorted(found)


# Flags XLA and libtpu read from the environment at compile time, beside the options a step passes.
COMPILER_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


def fingerprint(lowered: jax.stages.Lowered, compiler_options: dict, devices: list[int], topology: Topology) -> str:
    """sha256 of what XLA's compile of `lowered` depends on. The program text carries no source
    locations outside its kernels, and `plan` lowers those without directories, so checkouts at
    different paths agree."""
    parts = [lowered.as_text(), json.dumps(compiler_options, sort_keys=True), topology.name,
             json.dumps(devices), json.dumps(installed(), sort_keys=True),
             *(os.environ.get(name, "") for name in COMPILER_ENVIRONMENT)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def _locations_without_directories():
    """Pallas kernels (Triton's, Mosaic's) carry their source locations inside the lowered program,
    and those name the checkout's directory. Debug information only, it does not change what XLA
    makes of the program; without the directories a step lowers, and fingerprints, alike in every
    checkout."""
    name = "jax_hlo_source_file_canonicalization_regex"
    previous = getattr(jax.config, name)
    jax.config.update(name, r".*/")
    try:
        yield
    finally:
        jax.config.update(name, previous)


def plan(config: Config, topology: Topology, cache: Path | None = None, slots: int = 1) -> Plan:
    """Compile `config`'s train step (grad accumulation included) for `topology`, for rows of `slots`
    documents in slots (1: whole rows); raises on failure. With `cache`, a plan recorded there under
    the same fingerprint is returned without compiling, and a new one is recorded."""
    mesh = build_mesh(config, compile_only_devices(topology))
    start = time.perf_counter()
    with jax.set_mesh(mesh), axis_rules(), _locations_without_directories():
        setup = build(config, mesh)
        if topology.chip.platform == "gpu":
            setup = setup._replace(compiler_options={**COMPILE_ONLY_GPU_FLAGS, **setup.compiler_options})
        batch = abstract_batch(setup, config.data.batch_size, config.data.seq_len)
        lowered = jit_step(setup, config.optimizer.grad_accum, slots).lower(abstract_state(setup), batch)
        key = fingerprint(lowered, setup.compiler_options, [int(d.id) for d in mesh.devices.flat], topology)
        recorded = cache / f"{topology.name}-{key[:16]}.json" if cache else None
        if recorded and recorded.exists():
            stored = json.loads(recorded.read_text())
            if stored["fingerprint"] == key:  # the program is the one recorded; the budget is today's
                budget = topology.chip.budget_gib
                return Plan(**{**stored, "cached": True, "budget_gib": round(budget, 2),
                               "fits": stored["total_gib"] <= budget})
        compiled = lowered.compile()
    seconds = time.perf_counter() - start
    backend = setup.model.runtime.attention_backend
    blocks = BACKENDS[backend].tiles(setup.model.runtime.attention_blocks)
    stats, program = compiled.memory_analysis(), compiled.as_text()
    sizes = {name: getattr(stats, f"{name}_size_in_bytes") / GIB for name in ("argument", "temp", "output", "alias")}
    total = sizes["argument"] + sizes["temp"] + sizes["output"] - sizes["alias"]
    tokens = config.data.batch_size * config.data.seq_len
    result = Plan(topology=topology.name, chip=topology.chip.name, devices=mesh.size,
                  mesh={k: int(v) for k, v in mesh.shape.items()}, attention_backend=backend.value,
                  attention_kernels=kernel_names(program),
                  attention_blocks={name: getattr(blocks, name) for name in BACKENDS[backend].block_fields},
                  **{f"{name}_gib": round(value, 3) for name, value in sizes.items()}, total_gib=round(total, 3),
                  hbm_gib=round(topology.chip.hbm_gib, 2), budget_gib=round(topology.chip.budget_gib, 2),
                  fits=total <= topology.chip.budget_gib, compilers=installed(),
                  model_tflops_per_step=round(config.model.flops_per_token(config.data.seq_len // slots) * tokens / 1e12, 1),
                  compile_seconds=round(seconds, 1), xla_flags=setup.compiler_options,
                  host_gib=round(getattr(stats, "host_temp_size_in_bytes", 0) / GIB, 3), fingerprint=key,
                  slots=slots, loss_loop_collectives=loop_collectives(program, LOOP_SCOPE))
    if recorded:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        staged = recorded.with_suffix(".partial")  # a killed plan leaves no half-written entry
        staged.write_text(json.dumps(dataclasses.asdict(result), indent=1, sort_keys=True) + "\n")
        staged.replace(recorded)
    return result
