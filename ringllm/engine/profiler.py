"""One rank's torch profiler: started and stopped on command, each stop writing a Chrome trace named after
the rank into the profile directory. The engine and every worker process keep one each."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


class RankProfiler:
    def __init__(self, profile_dir: str, rank: int, device: torch.device):
        self.profile_dir, self.rank, self.device = Path(profile_dir), rank, device
        self._prof: Any = None  # a torch.profiler.profile while running (imported only when used)

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        """Records CPU activity, and CUDA activity on a GPU rank; nothing if it already runs."""
        if self._prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities, record_shapes=False)
        self._prof.start()

    def stop(self) -> Path | None:
        """Stops and writes the trace; returns its path (None if nothing was running)."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        prof.stop()
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        path = self.profile_dir / f"trace-rank{self.rank}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        prof.export_chrome_trace(str(path))
        return path
