"""A table of float64 numbers in shared memory, one row per app worker.

Each worker writes only its own row, so no lock is needed; a reader sums the rows to get totals over every
worker. The app keeps its request metrics here: whichever worker answers /metrics then reports the whole
server, and a counter never goes backwards because a scrape reached another worker. Values are stored as
whole aligned 8-byte words through a memoryview, which another process never sees torn."""

from __future__ import annotations

import posix_ipc

from ringllm.ipc.ring import map_segment

COLUMNS = 128  # per row; the app's metrics use fewer


class SharedTable:
    def __init__(self, name: str, rows: int = 0, create: bool = False):
        self.name = name
        self.shm, self.map = map_segment(name, max(1, rows) * COLUMNS * 8 if create else None)
        self.values = memoryview(self.map).cast("d")
        self.rows = len(self.values) // COLUMNS
        self._views: list[memoryview[float]] = []  # released before the mapping closes

    def row(self, index: int) -> memoryview[float]:
        """Row `index` as a writable view of COLUMNS float64 values."""
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} of a table with {self.rows} rows")
        view = self.values[index * COLUMNS : (index + 1) * COLUMNS]
        self._views.append(view)
        return view

    def totals(self) -> list[float]:
        """Each column summed over the rows."""
        flat = self.values.tolist()
        return [sum(flat[c::COLUMNS]) for c in range(COLUMNS)]

    def close(self, unlink: bool = False) -> None:
        for view in self._views:
            view.release()
        self.values.release()
        self.map.close()
        if unlink:
            try:
                self.shm.unlink()
            except posix_ipc.ExistentialError:
                pass  # removed already
