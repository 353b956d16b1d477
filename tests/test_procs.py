"""Starting servers together: port blocks that cannot collide, and simulators started at once, all stopped when
one fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.local.procs import SimStart, free_port_blocks, port_free, start_sims


def _running_with(argument: str) -> list[int]:
    """PIDs of processes whose command line holds ``argument`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if argument.encode() in cmdline.read_bytes().split(b"\0"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


def test_port_blocks_never_overlap_each_other_or_what_is_taken() -> None:
    taken = {p for first in free_port_blocks(5, 3) for p in range(first, first + 3)}
    before = set(taken)
    firsts = free_port_blocks(20, 3, taken)
    blocks = [set(range(first, first + 3)) for first in firsts]
    assert len(firsts) == 20
    assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    assert all(not (block & before) for block in blocks)
    assert taken == before.union(*blocks)  # the new blocks are added to what the caller holds
    assert all(port_free(p) for block in blocks for p in block)


def test_start_sims_starts_them_together_and_stops_all_when_one_fails(tmp_path: Path) -> None:
    good, bad, last = free_port_blocks(3)
    children = start_sims([SimStart("a", "m", good), SimStart("b", "m", bad, ("--time-scale", "0"))], tmp_path)
    try:
        assert [c.name for c in children] == ["a", "b"] and all(c.alive() for c in children)
    finally:
        for child in children:
            child.stop()
    with pytest.raises(RuntimeError, match="broken exited with 2"):
        start_sims([SimStart("broken", "m", bad, ("--time-scale", "-1")), SimStart("fine", "m", last)], tmp_path)
    assert _running_with(str(last)) == []  # the one that would have started was stopped too
