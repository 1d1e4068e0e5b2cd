"""Every test that starts what makes a test slow carries a marker (`make test-fast` leaves those out), read
from the source: a test reaches a child interpreter (8 virtual devices, a second host, the trainer's CLI,
a kill, a compile for an accelerator) or the pretrained model through its own body, the module's helpers
and the fixtures it asks for. The markers live in the test modules, so renaming one cannot drop them."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MARKERS = {"slow", "multiprocess", "compile"}  # pyproject.toml describes them
# What a test may not reach unmarked: names, and strings naming a child program.
HEAVY_NAMES = {"run_on_8_devices", "Popen", "smollm2"}
HEAVY_STRINGS = ("kill_at.py", "nextlong_jax.train_cli", "--compile-only")


def _marks(decorators: list[ast.expr]) -> set[str]:
    marks = set()
    for node in decorators:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Attribute) \
                    and inner.value.attr == "mark":
                marks.add(inner.attr)
    return marks


def _module_marks(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return _marks([node.value])
    return set()


def _uses(function: ast.FunctionDef) -> tuple[set[str], bool]:
    """The names a function refers to (its parameters, the fixtures, included), and whether it starts a
    child of its own module's file or names a heavy program."""
    names = {arg.arg for arg in function.args.args}
    strings = False
    for node in ast.walk(function):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings = strings or any(s in node.value for s in HEAVY_STRINGS)
    child_of_itself = "subprocess" in names and "__file__" in names
    return names, strings or child_of_itself


def unmarked_heavy_tests(source: str, shared: dict[str, ast.FunctionDef] | None = None) -> list[str]:
    """Tests of a module's `source` that reach something heavy without a marker; `shared` holds the
    conftest's fixtures."""
    tree = ast.parse(source)
    functions = {**(shared or {}), **{n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}}
    module_marks = _module_marks(tree)

    def heavy(name: str, seen: set[str]) -> bool:
        names, direct = _uses(functions[name])
        seen.add(name)
        return direct or bool(names & HEAVY_NAMES) or any(
            heavy(other, seen) for other in names & functions.keys() - seen)

    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
            and not (module_marks | _marks(node.decorator_list)) & MARKERS and heavy(node.name, set())]


def _conftest_fixtures() -> dict[str, ast.FunctionDef]:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_heavy_test_is_marked():
    shared = _conftest_fixtures()
    unmarked = [f"{path.name}::{name}" for path in sorted(TESTS.glob("test_*.py")) if path.name != Path(__file__).name
                for name in unmarked_heavy_tests(path.read_text(), shared)]
    assert not unmarked, "mark these (pytest.mark.slow, multiprocess or compile):\n" + "\n".join(unmarked)


def test_the_check_finds_a_heavy_test_through_helpers_and_fixtures():
    planted = '''
import subprocess, pytest

def _child():
    return subprocess.run([sys.executable, __file__])

@pytest.fixture
def started():
    return _child()

def test_via_fixture(started): ...
def test_via_helper(): _helper()
def _helper(): run_on_8_devices(__file__)
def test_pretrained(smollm2): ...
def test_cli(): subprocess.run(["python", "-m", "nextlong_jax.train_cli"])
def test_light(): assert parse_topology("v5p-8").count == 1
@pytest.mark.slow
def test_marked(started): ...
'''
    assert unmarked_heavy_tests(planted) == ["test_via_fixture", "test_via_helper", "test_pretrained", "test_cli"]
    assert unmarked_heavy_tests("import pytest\npytestmark = [pytest.mark.multiprocess]\n" + planted) == []
