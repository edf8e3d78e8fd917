"""Run model-written Python in a separate, limited process and read back one JSON result.

A candidate program can crash, loop forever, allocate without bound, print without end, open sockets or write
files. None of that may crash or stall the run that sampled it, so `run_python` executes it:

- in a fresh interpreter (`python -I -S`: standard library only, no `PYTHON*` variables) with an empty environment,
  in a temporary working folder that is deleted afterwards;
- under resource limits set before the program starts: address space (`memory_mb`), CPU seconds, file size, and a
  wall-clock `timeout` after which its process group gets SIGTERM, then SIGKILL; the parent keeps only the last
  megabyte of its output;
- in new user, network and PID namespaces (`unshare -rn --pid --fork --kill-child`) where the kernel allows it: no
  network, and no process of the program outlives it;
- behind a Python audit hook, installed before the candidate's first line (audit hooks cannot be removed) and
  holding its state in a closure, that refuses sockets, subprocesses and forks, `ctypes`, `sqlite3` / `dbm`, frame
  introspection, writes through `os.open` and every other write, rename or removal outside the working folder.

The audit hook is a guard against the accidents of a language model, not a security boundary against a hostile
author of native code; run untrusted people's programs in a container as well.

The result comes back after a marker line that is random per run, so a program that prints a fake one yields
nothing; the caller re-verifies whatever it gets anyway.
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

# Executed by the sandboxed interpreter: limits, the audit hook, then the candidate with its injected globals. All
# the hook reads is bound in its closure, so the candidate cannot switch it off by rebinding module globals.
_RUNNER = r"""
def _sandbox():
    import json, os, resource, sys
    limits = json.loads(sys.argv[1])
    del sys.argv[1:]  # the per-run marker stays out of the candidate's reach
    memory = limits["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    source = sys.stdin.buffer.read().decode("utf-8")
    payload = json.loads(source[: int(limits["payload_chars"])])
    code = source[int(limits["payload_chars"]):]
    write, flush, dumps, marker = sys.stdout.write, sys.stdout.flush, json.dumps, limits["marker"]
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    workdir = realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "pty.", "ctypes.", "shutil.rmtree", "os.chmod", "os.chown",
               "sqlite3.", "sys._getframe", "sys._current_frames", "sys.setprofile", "sys.settrace", "os.mkfifo",
               "os.mknod", "os.chdir")
    blocked_modules = ("ctypes", "_ctypes", "socket", "_socket", "_posixsubprocess", "sqlite3", "_sqlite3", "dbm",
                       "_dbm", "_gdbm", "mmap", "signal", "_signal", "faulthandler")
    frame_attributes = ("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals")
    changes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
               "os.utime", "os.replace")

    def inside(path):
        path = realpath(fsdecode(path))
        return path == workdir or path.startswith(workdir + sep)

    def audit(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in blocked_modules:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attributes:
            raise PermissionError("sandbox: frame introspection is not allowed")
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & write_flags)
            if writing and (mode is None or not inside(args[0])):  # os.open may use dir_fd: refused when writing
                raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        if event in changes:
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} is not allowed")
            if len(args) > 2 and any(isinstance(a, int) and a >= 0 for a in args[2:]):
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")

    import math, random, itertools, functools, fractions, statistics, collections  # before the hook: usual tools
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__, **payload["globals"]}
    sys.addaudithook(audit)
    try:
        exec(compile(code, "<candidate>", "exec"), namespace)
    except SystemExit as stop:  # sys.exit() ends the program, not the sandbox: a status 0 still has a result
        if stop.code not in (None, 0):
            raise
    result = eval(payload["result_expression"], namespace)
    write("\n" + marker + "\n" + dumps(result) + "\n")
    flush()


_sandbox()
"""


@dataclass
class SandboxResult:
    """What a sandboxed program did: `ok` and its JSON `value`, or the reason it has none (`error`)."""

    ok: bool
    value: Any = None
    error: str | None = None
    output: str = ""  # the program's stdout and stderr, last `max_output_chars`
    seconds: float = 0.0


@functools.cache
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that puts the sandbox in new user, network and PID namespaces (`unshare`, no root needed):
    no network but a loopback that is down, and every process of the program dies with it. Empty where the kernel
    or the container does not allow it (the audit hook still refuses sockets and subprocesses then)."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "-rn", "--pid", "--fork", "--kill-child"), ("unshare", "-rn")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def network_namespace_available() -> bool:
    return bool(isolation_prefix())


# What the parent keeps of a program's output: the tail, so a program printing without end cannot fill its memory.
_KEPT_OUTPUT_BYTES = 1024 * 1024


def run_python(
    code: str,
    injected_globals: dict[str, Any] | None = None,
    result_expression: str = "None",
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_chars: int = 2000,
) -> SandboxResult:
    """Run `code` in a sandboxed interpreter (standard library only) with `injected_globals` (JSON values) defined,
    and return the JSON of `result_expression` evaluated in its namespace afterwards. Never raises for anything the
    program does."""
    import secrets
    import threading
    import time

    marker = f"hf_ext-sandbox-result-{secrets.token_hex(16)}"  # per run: a program cannot print it in advance
    payload = json.dumps({"globals": injected_globals or {}, "result_expression": result_expression})
    limits = {
        "memory_mb": int(memory_mb),
        "cpu_seconds": max(1, int(timeout) + 1),
        "file_bytes": 16 * 1024 * 1024,
        "payload_chars": len(payload),
        "marker": marker,
    }
    command = [*isolation_prefix(), sys.executable, "-I", "-S", "-c", _RUNNER, json.dumps(limits)]
    start = time.perf_counter()
    tail = bytearray()

    def read(stream) -> None:
        while chunk := stream.read(65536):
            tail.extend(chunk)
            if len(tail) > 2 * _KEPT_OUTPUT_BYTES:
                del tail[: len(tail) - _KEPT_OUTPUT_BYTES]

    with tempfile.TemporaryDirectory(prefix="hf_ext-sandbox-") as workdir:
        try:
            process = subprocess.Popen(
                command, cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as error:
            return SandboxResult(False, error=f"could not start the sandbox: {error}")
        reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
        reader.start()
        try:
            process.stdin.write((payload + code).encode("utf-8"))
            process.stdin.close()
        except BrokenPipeError:  # the program ended (or was killed) before reading all of its source
            pass
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(process)
            timed_out = True
        reader.join(timeout=5)
    seconds = time.perf_counter() - start
    text = bytes(tail).decode("utf-8", errors="replace")
    output, found, result = text.rpartition("\n" + marker + "\n")
    if not found:
        output, result = text, ""
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


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the program's process group, SIGKILL one second later."""
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(returncode: int, output: str) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else returncode
        return f"killed by {name} (a resource limit)"
    last = [line for line in output.strip().splitlines() if line.strip()]
    if last and ("MemoryError" in last[-1]):
        return "MemoryError (memory limit)"
    return last[-1][:300] if last else f"exited with status {returncode}"
