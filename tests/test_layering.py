"""The packages' layers: `synth` (the writer) and `nextlong_jax` (the trainer) each import
`nextlong_contract` and never each other, `nextlong_contract` imports neither, and `nextlong_eval` sits
above all three. Read from the source, every import statement (those inside functions too), so an
import made lazy cannot hide a crossing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project's packages it may import
LAYERS = {"nextlong_contract": set(), "synth": {"nextlong_contract"}, "nextlong_jax": {"nextlong_contract"},
          "nextlong_eval": {"nextlong_contract", "synth", "nextlong_jax"}}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_each_package_imports_only_the_layers_below_it():
    crossings = [f"{path.relative_to(ROOT)} imports {name}"
                 for package, allowed in LAYERS.items() for path in sorted((ROOT / package).rglob("*.py"))
                 for name in sorted(_imported_packages(path) - allowed - {package})]
    assert not crossings, "\n".join(crossings)
    assert _imported_packages(ROOT / "nextlong_eval" / "ablation.py") >= {"synth", "nextlong_jax"}  # the check reads


def test_synthesis_options_load_no_index_or_model_library():
    """`synth.config` names the index kinds and embedders; importing it (every `nextlong-synth --help`)
    must not load faiss, ScaNN, TensorFlow or torch."""
    heavy = ("faiss", "scann", "tensorflow", "torch", "jax")
    loaded = subprocess.run([sys.executable, "-c", f"import sys, synth.config; print([m for m in {heavy!r} "
                             "if m in sys.modules])"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_model_config_loads_no_jax():
    """`LlamaConfig` is the architecture alone: jax comes in with how the model runs (`model.runtime`)."""
    code = "import sys, nextlong_jax.model.config; print('jax' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False", loaded.stdout
