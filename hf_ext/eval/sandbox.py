"""Run model-written Python in a separate, limited process and read back one JSON result.

A candidate program can crash, loop forever, allocate without bound, open sockets or write files. None of that may
crash or stall the run that sampled it, so `run_python` executes it:

- in a fresh interpreter (`python -I`: no user site-packages, no `PYTHON*` variables) with an empty environment,
  in a temporary working folder that is deleted afterwards;
- under resource limits set before the program starts: address space (`memory_mb`), CPU seconds, file size, and a
  wall-clock `timeout` after which its whole process group gets SIGTERM, then SIGKILL;
- without network: in a new network namespace (`unshare -rn`, only a loopback that is down) where the kernel allows
  it, and always behind a Python audit hook that refuses sockets, subprocesses, `ctypes` and writes outside the
  working folder. The hook is installed before the candidate's first line, and audit hooks cannot be removed.

The audit hook is a guard against accidents of a language model, not a security boundary against a hostile author
of native code; run untrusted programs from people in a container as well.

The program talks back through one channel: the runner prints the JSON of `result_expression` evaluated after the
program, after a marker line, so the program's own prints (captured, last `max_output_chars` kept) cannot forge it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

RESULT_MARKER = "\x00hf_ext-sandbox-result\x00"

# Executed by the sandboxed interpreter: limits, the audit hook, then the candidate with its injected globals.
_RUNNER = r'''
import json, os, resource, sys
limits = json.loads(sys.argv[1])
memory = limits["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
workdir = os.path.realpath(os.getcwd())
source = sys.stdin.buffer.read().decode("utf-8")
payload = json.loads(source[: int(limits["payload_chars"])])
code = source[int(limits["payload_chars"]):]
stdout = sys.stdout
marker = limits["marker"]

_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "pty.", "ctypes.", "shutil.rmtree", "os.chmod", "os.chown")

def _audit(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing:
            path = os.path.realpath(os.fsdecode(args[0]))
            if not (path == workdir or path.startswith(workdir + os.sep)):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate"):
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(path))
                if not (path == workdir or path.startswith(workdir + os.sep)):
                    raise PermissionError(f"sandbox: {event} on {path} is not allowed")

import math, random, itertools, functools, fractions  # the candidate's usual tools, imported before the hook
sys.addaudithook(_audit)
namespace = {"__name__": "__main__", **payload["globals"]}
exec(compile(code, "<candidate>", "exec"), namespace)
result = eval(payload["result_expression"], namespace)
stdout.write(marker + "\n" + json.dumps(result) + "\n")
stdout.flush()
'''


@dataclass
class SandboxResult:
    """What a sandboxed program did: `ok` and its JSON `value`, or the reason it has none (`error`)."""

    ok: bool
    value: Any = None
    error: str | None = None
    output: str = ""  # the program's stdout and stderr, last `max_output_chars`
    seconds: float = 0.0


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (a user and network namespace, no root needed) works on this machine."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_python(
    code: str,
    injected_globals: dict[str, Any] | None = None,
    result_expression: str = "None",
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_chars: int = 2000,
) -> SandboxResult:
    """Run `code` in a sandboxed interpreter with `injected_globals` (JSON values) defined, and return the JSON of
    `result_expression` evaluated in its namespace afterwards. Never raises for anything the program does."""
    import time

    payload = json.dumps({"globals": injected_globals or {}, "result_expression": result_expression})
    limits = {
        "memory_mb": int(memory_mb),
        "cpu_seconds": max(1, int(timeout) + 1),
        "file_bytes": 16 * 1024 * 1024,
        "payload_chars": len(payload),
        "marker": RESULT_MARKER,
    }
    command = [sys.executable, "-I", "-S", "-c", _RUNNER, json.dumps(limits)]
    if network_namespace_available():
        command = ["unshare", "-rn", *command]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_ext-sandbox-") as workdir:
        try:
            process = subprocess.Popen(
                command, cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as error:
            return SandboxResult(False, error=f"could not start the sandbox: {error}")
        try:
            raw, _ = process.communicate((payload + code).encode("utf-8"), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            raw = _stop(process)
            timed_out = True
    seconds = time.perf_counter() - start
    text = raw.decode("utf-8", errors="replace")
    output, _, result = text.partition(RESULT_MARKER + "\n")
    output = output[-max_output_chars:]
    if timed_out:
        return SandboxResult(False, error=f"timed out after {timeout:g} s", output=output, seconds=seconds)
    if process.returncode != 0 or not result:
        return SandboxResult(False, error=_failure(process.returncode, output), output=output, seconds=seconds)
    try:
        value = json.loads(result)
    except json.JSONDecodeError:
        return SandboxResult(False, error="the result is not JSON", output=output, seconds=seconds)
    return SandboxResult(True, value=value, output=output, seconds=seconds)


def _stop(process: subprocess.Popen) -> bytes:
    """SIGTERM to the program's process group, SIGKILL one second later; what it had written."""
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            raw, _ = process.communicate(timeout=grace)
            return raw or b""
        except subprocess.TimeoutExpired:
            continue
    return b""


def _failure(returncode: int, output: str) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else returncode
        return f"killed by {name} (a resource limit)"
    last = [line for line in output.strip().splitlines() if line.strip()]
    if last and ("MemoryError" in last[-1]):
        return "MemoryError (memory limit)"
    return last[-1][:300] if last else f"exited with status {returncode}"
