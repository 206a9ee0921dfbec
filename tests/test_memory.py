"""gateway.memory: glibc's mmap threshold is fixed where glibc is there, and nothing breaks elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gateway import memory

# Bundle-sized buffers freed between long-lived small objects (as a job's payloads are): how many bytes the
# heap keeps free afterwards. Without the fixed threshold glibc serves the buffers from the heap after the
# first free and ~2 MB stay stranded there; with it they are mmapped and given back.
_SCENARIO = """
import ctypes, sys
from gateway.memory import return_large_buffers_to_the_os
if sys.argv[1] == "fixed":
    assert return_large_buffers_to_the_os()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
keep, small = [], []
for i in range(300):
    keep.append(bytes(400_000 + i))
    small.append(b"x" * 600 + bytes([i % 256]))
    if len(keep) > 3:
        keep.pop(0)
print(libc.mallinfo2().fordblks)
"""


def _free_in_heap(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_bundle_sized_buffers_do_not_stay_in_the_heap() -> None:
    assert _free_in_heap("fixed") < 400_000  # not even one buffer's worth left behind
    assert _free_in_heap("default") > 1_000_000  # what the setting prevents (glibc's dynamic threshold)


def test_elsewhere_it_is_a_harmless_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.return_large_buffers_to_the_os() is False


def test_start_up_objects_leave_the_cyclic_collector() -> None:
    import gc

    from gateway.memory import freeze_start_up_objects

    survivor = [[n, "schema"] for n in range(1000)]  # as a schema or a plan: held for the process's life
    gc.unfreeze()
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() >= len(survivor)
        scanned = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert all(gc.is_tracked(x) and id(x) not in scanned for x in survivor)
    finally:
        gc.unfreeze()
