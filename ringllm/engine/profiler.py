"""One rank's torch profiler: started and stopped on command, each stop writing a Chrome trace named after
the rank into the profile directory. The engine and every worker process keep one each.

A profile costs the server: every step's events are held in memory until the stop, and the stop writes the trace
on the engine's loop, every stream waiting meanwhile (a key holder's profiles wrote 819 MB in 40 s and stalled a
stream 13.9 s, issue 28). So a profile started on command ends itself, cleanly (its trace written), after
--profile-max-steps engine steps as well as after --profiler-max-seconds, which bounds each trace and each stall
(a trace holds each step's kernels and ops); and once this process has written --profile-max-mb of traces,
starting another is refused until a restart, which bounds the disk. A profile of the whole run (--profile) has no
step cap: the one asking is the operator.

A stopped profile's memory goes back to the OS at its stop (see `stop`), so profiles started again and again keep
the process flat."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from ringllm.ipc.process import trim_heap


class RankProfiler:
    def __init__(self, profile_dir: str, rank: int, device: torch.device, max_bytes: int):
        self.profile_dir, self.rank, self.device = Path(profile_dir), rank, device
        self._prof: Any = None  # a torch.profiler.profile while running (imported only when used)
        self.max_bytes, self.written = max_bytes, 0  # the trace budget, and the bytes written so far
        self.steps_left: int | None = None  # the steps this profile may still record (None: no cap)

    @property
    def running(self) -> bool:
        return self._prof is not None

    @property
    def spent(self) -> bool:
        """Whether this process has written its `max_bytes` of traces: no profile starts any more."""
        return self.written >= self.max_bytes

    def start(self, max_steps: int | None = None) -> bool:
        """Records CPU activity, and CUDA activity on a GPU rank, for at most `max_steps` steps (see `step`);
        nothing if it already runs. False, starting nothing, when the trace budget is spent."""
        if self._prof is not None:
            return True
        if self.spent:
            return False
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities, record_shapes=False)
        self._prof.start()
        self.steps_left = max_steps
        return True

    def step(self) -> bool:
        """Counts one engine step recorded; true when the profile has recorded its last and must stop."""
        if self._prof is None or self.steps_left is None:
            return False
        self.steps_left -= 1
        return self.steps_left <= 0

    def stop(self) -> Path | None:
        """Stops and writes the trace, then releases the profile's memory; returns the trace's path (None if
        nothing was running)."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        try:
            prof.stop()
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            path = self.profile_dir / f"trace-rank{self.rank}-{time.strftime('%Y%m%d-%H%M%S')}.json"
            prof.export_chrome_trace(str(path))
        finally:
            del prof
            _release_stopped_profile()
        self.written += path.stat().st_size
        return path


def _release_stopped_profile() -> None:
    """Frees a dropped profiler's recorded events and hands their pages back to the OS. torch.profiler.profile
    holds bound methods of itself (its action map), so dropping the last reference frees nothing: its kineto results
    (every op of every step) wait for a full collection of the interpreter's cycles, which an engine busy with
    tensors rarely reaches; and what a collection frees, glibc keeps. Measured on the CPU demo engine, 20-step
    profiles (14 MB traces): +77 MB of RSS per profile until a full collection happened to run (the abuse soak's
    profiles grew an engine 1.5-3 GB); collected at each stop, flat but 85 MB above the trimmed level; collected
    and trimmed, flat. The collection walks every object of the process (300k in the demo engine: 0.13-0.25 s on a
    busy 2-core machine), once per profile, beside a stop and a trace's write that stall the loop for seconds."""
    gc.collect()
    trim_heap()
