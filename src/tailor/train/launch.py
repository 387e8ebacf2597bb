"""`tailor train --nproc N`: start N training processes on this machine with torchrun's own launcher.

The command line is torchrun's (`--standalone --nproc-per-node N -m tailor train ...`), parsed and run by
`torch.distributed.run` itself, so `tailor train --nproc N ...` is exactly `torchrun --standalone
--nproc-per-node N -m tailor train ...`. For several machines run torchrun directly (docs/distributed.md).

When a process fails (an exception, a kill), torchrun stops the others; `launch` then turns torchrun's
report into one line naming the rank and what happened to it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path


class ProcessFailedError(RuntimeError):
    """A training process failed; the message names its rank and its error (or the signal that ended it)."""


def torchrun_arguments(nproc: int, train_arguments: Sequence[str]) -> list[str]:
    """torchrun's arguments for N processes on this machine running `tailor train <train_arguments>`."""
    return ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "tailor", "train",
            *train_arguments]


def launch(nproc: int, train_arguments: Sequence[str]) -> None:
    """Run `tailor train <train_arguments>` in `nproc` processes; return when all finished well, raise
    ProcessFailedError naming the first failed rank otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(torchrun_arguments(nproc, train_arguments)))
    except ChildFailedError as failed:
        raise ProcessFailedError(describe_failure(failed, nproc)) from None


def describe_failure(failed, nproc: int) -> str:
    """One line from torchrun's ChildFailedError: the process that failed first, and why.

    When one process dies the others fail too: at their next collective ("connection closed by peer"),
    or by the SIGTERM with which torchrun stops them. The cause is a process killed by another signal,
    else the earliest error recorded (record_failure notes the time to the microsecond; torchrun's own
    timestamps are whole seconds and often tie), else an exit code, and a SIGTERM last."""
    def order(item):
        _, failure = item
        recorded = failure.message if isinstance(failure.message, dict) else {}
        stopped_by_torchrun = failure.exitcode == -signal.SIGTERM
        category = 2 if stopped_by_torchrun else 0 if failure.exitcode < 0 else 1
        return category, recorded.get("extraInfo", {}).get("failed_at", float("inf"))

    rank, failure = min(failed.failures.items(), key=order)
    message = failure.message
    if isinstance(message, dict):  # written by the process itself (record_failure)
        message = message.get("message", "")
    if failure.exitcode < 0:
        what = f"was killed by {failure.signal_name()}"
    elif message and not message.startswith("To enable traceback"):
        what = f"failed: {message}"
    else:
        what = f"exited with code {failure.exitcode} (its traceback is printed above)"
    return f"training process rank {rank} (of {nproc}) {what}; torchrun stopped the other processes."


def record_failure(message: str) -> None:
    """Under torchrun, leave this process's error where the launcher reads it (TORCHELASTIC_ERROR_FILE,
    in the shape torch's ErrorHandler writes, plus the time to the microsecond), so that the launcher's
    report quotes it; nothing otherwise."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        now = time.time()
        extra = {"timestamp": str(int(now)), "failed_at": now}
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))


__all__ = ["ProcessFailedError", "describe_failure", "launch", "record_failure", "torchrun_arguments"]
