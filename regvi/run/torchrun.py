"""``python -m regvi.run.torchrun ARGS``: torchrun (``python -m torch.distributed.run ARGS``)
as the per-host agent of a multi-node sweep element, made safe for LSF's warning signal.

LSF sends the job's warning signal (``bsub -wa USR2``, see :mod:`regvi.sweep`) to the job's
processes. torchrun's agent does not handle ``SIGUSR2``: its default action would kill the
agent (exit 140) and with it the element, before the workers could write their checkpoint.
This entry point starts torchrun in this process with ``SIGUSR2`` caught instead: the signal
is passed on to the agent's workers (torchrun starts each in a session of its own, so a
signal sent to the job's process group does not reach them), whose handler
(:mod:`regvi.train.preemption`) makes every rank stop at the next training step, rank 0
write the checkpoint, and every rank exit with ``REQUEUE_EXIT_CODE``. A worker that has not
installed its handler yet (still starting) is left alone: the signal's default action would
kill it, and the other ranks, once one of them has it, stop all ranks together.

``SIGTERM`` stays torchrun's own: it sends ``SIGTERM`` on to its workers, which treat it as
a pre-emption too (checkpoint, exit), and kills them if they have not exited within its
``--shutdown_timeout`` (30 s by default).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The signals passed on to the workers.
FORWARDED = (signal.SIGUSR2,)


def child_pids(parent: int | None = None) -> list[int]:
    """The processes whose parent is ``parent`` (default: this one), from ``/proc``."""
    parent = os.getpid() if parent is None else parent
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return sorted(children)


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (``SigCgt`` in
    ``/proc/<pid>/status``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def forward(signum: int, frame: Any = None) -> list[int]:
    """Send ``signum`` to this process's children that handle it; return their ids."""
    sent = []
    for pid in child_pids():
        if catches(pid, signum):
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
                sent.append(pid)
    return sent


def main(argv: Sequence[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: this command's arguments), forwarding
    :data:`FORWARDED` signals to its workers."""
    from torch.distributed.run import main as torchrun_main

    for sig in FORWARDED:
        signal.signal(sig, forward)
    torchrun_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
