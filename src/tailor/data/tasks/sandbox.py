"""Run model-written Python functions against unit tests, isolated: the code task's scorer.

One subprocess (`python -I`, in a fresh temporary directory, a bare environment) takes a batch of answers
on stdin and forks one child per answer, at most os.cpu_count() at a time. Each child, before it runs the
answer, gets its own directory as cwd and
- resource limits: CPU seconds, 1 GiB of address space, 1 MiB per written file;
- an audit hook (PEP 578, which the answer cannot remove) that refuses sockets, subprocesses, forks,
  exec, ctypes, and any file write, rename, removal or directory change outside its directory.
The batch process kills a child that runs past the time limit (an infinite loop is a "timeout"). A child
reports one outcome through a pipe: passed, failed, error, timeout or no_function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

OUTCOMES = ("passed", "failed", "error", "timeout", "no_function")

# The batch process's program (run with `python -I -c`): stdin {"jobs": [...], "limit": s, "parallel": n};
# stdout the JSON list of outcomes, one per job, in order.
_RUNNER = r'''
import json, math, os, resource, select, signal, sys, time

request = json.load(sys.stdin)
jobs, limit, parallel = request["jobs"], request["limit"], request["parallel"]
top = os.getcwd()
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "pty.", "ctypes.", "os.chroot", "os.setuid")
FILE_CHANGES = {"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.rmdir": 1, "os.mkdir": 1,
                "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.chmod": 1, "os.chown": 1,
                "os.utime": 1, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2, "os.chdir": 1}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def inside(path, root):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)


def guard(root):
    def hook(event, args):
        if event.startswith(BLOCKED):
            raise PermissionError(f"the sandbox refuses {event}")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and path is not None and not inside(path, root):
                raise PermissionError(f"the sandbox refuses writing {path!r} outside its directory")
        elif event in FILE_CHANGES:
            for path in args[:FILE_CHANGES[event]]:
                if path is not None and not inside(path, root):
                    raise PermissionError(f"the sandbox refuses {event} on {path!r} outside its directory")
    return hook


def same(got, expected):
    if isinstance(got, tuple):
        return False
    return got == expected and isinstance(got, bool) == isinstance(expected, bool)


def run_one(job, root):
    seconds = max(1, math.ceil(limit))
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    os.chdir(root)
    sys.dont_write_bytecode = True
    sys.modules["socket"] = sys.modules["_socket"] = None  # `import socket` fails, and the hook stays
    sys.addaudithook(guard(root))
    try:
        namespace = {"__name__": "answer"}
        exec(compile(job["source"], "<answer>", "exec"), namespace)
        function = namespace.get(job["function"])
        if not callable(function):
            return "no_function"
        for args, expected in job["tests"]:
            if not same(function(*args), expected):
                return "failed"
        return "passed"
    except BaseException:
        return "error"


def child(job, root, write_end):
    try:
        outcome = run_one(job, root)
    except BaseException:
        outcome = "error"
    os.write(write_end, outcome.encode())
    os._exit(0)


outcomes = [None] * len(jobs)
running = {}  # read end -> (index, pid, deadline)
pending = list(range(len(jobs)))
while pending or running:
    while pending and len(running) < parallel:
        index = pending.pop(0)
        root = os.path.join(top, str(index))
        os.mkdir(root)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child(jobs[index], os.path.realpath(root), write_end)
        os.close(write_end)
        running[read_end] = (index, pid, time.monotonic() + limit)
    wait = max(0.0, min(deadline for _, _, deadline in running.values()) - time.monotonic())
    ready, _, _ = select.select(list(running), [], [], wait)
    for read_end in ready:
        index, pid, _ = running.pop(read_end)
        data = os.read(read_end, 64).decode()
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        killed_for_time = os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL)
        outcomes[index] = data or ("timeout" if killed_for_time else "error")
    now = time.monotonic()
    for read_end, (index, pid, deadline) in list(running.items()):
        if now >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            del running[read_end]
            outcomes[index] = "timeout"
json.dump(outcomes, sys.stdout)
'''


def run_answers(jobs: list[dict[str, Any]], time_limit_s: float = 2.0,
                parallel: int | None = None) -> list[str]:
    """The outcome of each job {"source": code, "function": name, "tests": [([args], expected), ...]}:
    "passed" when the function `name` the code defines returns `expected` (equal, bool not int) for every
    test's args within `time_limit_s` seconds in all; else failed, error, timeout or no_function.

    Raises:
        RuntimeError: the batch process itself failed (not an answer: answers only fail themselves).
    """
    if not jobs:
        return []
    request = {"jobs": jobs, "limit": time_limit_s, "parallel": parallel or os.cpu_count() or 1}
    with tempfile.TemporaryDirectory(prefix="tailor-sandbox-") as scratch:
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
        done = subprocess.run([sys.executable, "-I", "-c", _RUNNER], input=json.dumps(request), text=True,
                              capture_output=True, cwd=scratch, env=env,
                              timeout=60 + time_limit_s * len(jobs))
    if done.returncode != 0:
        raise RuntimeError(f"the code sandbox failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


__all__ = ["OUTCOMES", "run_answers"]
