"""The picker fixes glibc's mmap threshold (extproc/gateway/heap.py): a large block freed goes back to the
system, and the next ones are mapped again instead of settling in the heap. Checked in a fresh interpreter
each, by whether a 1 MiB allocation made after a 6 MiB one was freed gets a mapping of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import sys
from extproc.gateway.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()

def mappings():  # the start address of every mapping but the heap (brk moves its end)
    with open("/proc/self/maps") as f:
        return {line.split("-")[0] for line in f if not line.rstrip().endswith("[heap]")}

big = bytearray(6 * 2**20)
del big  # freed: glibc raises its threshold to 6 MiB unless the threshold is fixed
before = mappings()
block = bytearray(2**20)
print(len(mappings() - before))
"""


def probe(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc/self/maps: Linux only")
def test_a_large_block_is_mapped_again_after_one_was_freed() -> None:
    from extproc.gateway.heap import fix_mmap_threshold

    if not fix_mmap_threshold():
        pytest.skip("no glibc mallopt here (musl?)")
    assert probe("default") == 0  # glibc's own behaviour: the 1 MiB block comes from the heap
    assert probe("fixed") >= 1  # with the threshold fixed: its own mapping, returned on free


def test_the_environment_wins() -> None:
    from extproc.gateway import heap

    os.environ[heap.ENVIRONMENT] = "65536"
    try:
        assert heap.fix_mmap_threshold() is False
    finally:
        del os.environ[heap.ENVIRONMENT]
