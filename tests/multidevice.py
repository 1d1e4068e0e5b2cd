"""Run a test module's child part on 8 virtual CPU devices.

XLA reads the device count once, when jax starts, and the pytest process must keep its single
device for the other tests; so sharded tests run their body in another Python process. One such
process serves the whole test run: started at the first request, it runs each script as `__main__`
with its arguments (as `python script *args` would) and answers with what the script printed, so
the ~15 sharded checks pay for one interpreter and one jax start-up instead of one each. A script
that fails (an exception, a failed assert, a nonzero exit) fails its calling test with the
traceback and the process's log; a process that dies is replaced at the next request.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import runpy
import select
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The environment of a child process with 8 CPU devices.
ENV_8_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                 "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
TIMEOUT_S = 600

_worker: subprocess.Popen | None = None
_log = ""  # the file of the worker's stderr (jax's warnings, native logs), quoted when a script fails


def _start() -> subprocess.Popen:
    global _log
    if not _log:
        handle, _log = tempfile.mkstemp(prefix="nextlong-8-devices-", suffix=".log")
        os.close(handle)
        atexit.register(_stop)
    with open(_log, "ab") as log:  # appended to: the offsets read below stay valid
        return subprocess.Popen([sys.executable, __file__, "--serve"], env=ENV_8_DEVICES, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True)


def _stop() -> None:
    if _worker is not None and _worker.poll() is None:
        _worker.stdin.close()  # the worker ends at the end of its input
        try:
            _worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _worker.kill()
    with contextlib.suppress(OSError):
        os.remove(_log)


def _log_since(offset: int, limit: int) -> str:
    with open(_log, errors="replace") as log:
        log.seek(offset)
        return log.read()[-limit:]


def run_on_8_devices(script: str, *args: str) -> str:
    """stdout of `script` run as `python script *args` with 8 CPU devices; fails the calling test on error."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        _worker = _start()
    log_from = os.path.getsize(_log)
    _worker.stdin.write(json.dumps({"script": str(script), "args": list(args)}) + "\n")
    _worker.stdin.flush()
    ready, _, _ = select.select([_worker.stdout], [], [], TIMEOUT_S)
    line = _worker.stdout.readline() if ready else ""
    if not line:  # timed out or died: the next request starts a fresh process
        _worker.kill()
        _worker.wait()
        raise AssertionError(f"{Path(script).name} {' '.join(args)}: the 8-device process "
                             f"{'died' if ready else 'timed out'}\n{_log_since(log_from, 5000)}")
    reply = json.loads(line)
    if not reply["ok"]:
        raise AssertionError(f"{Path(script).name} {' '.join(args)} failed:\n{reply['stdout']}{reply['error']}"
                             f"\n{_log_since(log_from, 3000)}")
    return reply["stdout"]


def _serve() -> None:
    """Answer requests on stdin, one JSON line each, until stdin closes (the test run ends)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what native code writes to stdout must not mix with the replies
    for request in sys.stdin:
        request = json.loads(request)
        script = str(Path(request["script"]).resolve())
        out, error = io.StringIO(), ""
        sys.argv = [script, *request["args"]]
        sys.path.insert(0, str(Path(script).parent))  # as `python script` puts the script's folder first
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                error = f"exit status {e.code}"
        except BaseException:  # noqa: BLE001 - the calling test reports it
            error = traceback.format_exc()
        finally:
            sys.path.remove(str(Path(script).parent))
        replies.write(json.dumps({"ok": not error, "stdout": out.getvalue(), "error": error}) + "\n")
        replies.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
