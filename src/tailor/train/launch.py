"""`tailor train --nproc N`: start N training processes on this machine with torchrun's own launcher.

The command line is torchrun's (`--standalone --nproc-per-node N -m tailor train ...`), parsed and run by
`torch.distributed.run` itself, so `tailor train --nproc N ...` is exactly `torchrun --standalone
--nproc-per-node N -m tailor train ...`. For several machines run torchrun directly (README).

When a process fails (an exception, a kill), torchrun stops the others; `launch` then turns torchrun's
report into one line naming the rank and what happened to it.
"""

from __future__ import annotations

import json
import os
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
    """One line from torchrun's ChildFailedError: the first process to fail, and why."""
    rank, failure = failed.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # written by the process itself (tailor's CLI records its error there)
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
    in the shape torch's ErrorHandler writes), so that the launcher's report quotes it; nothing otherwise."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


__all__ = ["ProcessFailedError", "describe_failure", "launch", "record_failure", "torchrun_arguments"]
