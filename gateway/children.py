"""Child processes (bulk chain workers, the indexing process and its scanners) that end with their parent.

A child whose parent was killed (SIGKILL, OOM killer, a crash) is re-parented to init and carries on: a
chain worker then blocks for ever writing its result to a pipe nobody reads, holding export lines in
memory; an indexing process scans a whole export for no one. On Linux the kernel can kill a child when the
parent thread that started it exits (prctl PR_SET_PDEATHSIG); each child asks for that as its first step.
The thread that starts the children must therefore live as long as they do (it does: the pool's or the
index's owner waits for them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Call first thing in a child, with the parent's pid as the parent saw it before starting the child."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
