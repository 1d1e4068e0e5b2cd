"""Run a program and SIGKILL it at a chosen point: right after the Nth return of one of its functions.

    python tests/kill_at.py synth.store:_write_block 3 -m synth.cli ARGS...

A resume test then kills every run at the same point, on a fast machine or a slow one, instead of
racing a polling loop against the run. The function is replaced where it is defined (a module-level
function or a class's method), so it is counted wherever its own module calls it from.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys


def kill_after(target: str, calls: int) -> None:
    """Make the `calls`-th return of `target` ("module:function" or "module:Class.method") the last thing
    this process does."""
    module, _, qualname = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, count = getattr(owner, name), 0

    def counted(*args, **kwargs):
        nonlocal count
        result = original(*args, **kwargs)
        count += 1
        if count == calls:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, counted)


if __name__ == "__main__":
    target, calls, flag, program, *args = sys.argv[1:]
    assert flag == "-m", "usage: kill_at.py MODULE:FUNCTION N -m MODULE [ARGS...]"
    kill_after(target, int(calls))
    sys.argv = [program, *args]
    runpy.run_module(program, run_name="__main__", alter_sys=True)
