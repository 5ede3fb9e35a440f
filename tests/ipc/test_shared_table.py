"""The shared table (ipc/shared_table.py): rows written by other processes sum in the reader."""

import multiprocessing as mp
import os

import pytest

from ringllm.ipc.lifecycle import (
    leftover_segments,
    segment_name,
)
from ringllm.ipc.shared_table import SharedTable

CTX = mp.get_context("fork")
_counter = iter(range(10**9))


def _name():
    return segment_name(os.getpid(), f"t{next(_counter)}")


def _count_into_row(name, index, times):
    table = SharedTable(name)
    row = table.row(index)
    for _i in range(times):
        row[0] += 1
        row[1] += 0.5
    row[2] = index
    table.close()


def test_shared_table_sums_rows_written_by_other_processes():
    name = _name()
    table = SharedTable(name, rows=3, create=True)
    try:
        procs = [CTX.Process(target=_count_into_row, args=(name, i, 20_000 * (i + 1))) for i in range(3)]
        for p in procs:
            p.start()
        seen = []
        while any(p.is_alive() for p in procs):
            seen.append(table.totals()[0])  # read while the writers run: never torn, never going back
        for p in procs:
            p.join(10)
        assert seen == sorted(seen)
        totals = table.totals()
        assert totals[:3] == [120_000, 60_000.0, 0 + 1 + 2] and not any(totals[3:])
        with pytest.raises(IndexError):
            table.row(3)
    finally:
        table.close(unlink=True)
    assert name.lstrip("/") not in leftover_segments(os.getpid())
