"""A request as the scheduler sees it: its tokens, where its KV lives, and how far it has got."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from ringllm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ringllm.engine.core.radix_cache import Node


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams):
        self.rid = rid
        self.token_ids: list[int] = list(prompt_ids)  # known tokens: prompt, then outputs read back so far
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.arrival = time.monotonic()
        self.arrival_index = 0  # its place in the scheduler's arrival order (set when it is added)
        self.scheduled_at: float | None = None  # when first admitted (queue time = scheduled_at - arrival)
        # Placement, set while it holds a request row and KV slots:
        self.row: int | None = None
        self.group = 0  # micro-batch group under pipeline parallelism
        self.num_computed = 0  # positions whose KV is computed or scheduled to be
        self.num_cached = 0  # leading positions whose slots belong to the radix cache (locked)
        self.cache_node: Node | None = None  # with the radix cache: the locked end of its cached prefix
        self.prompt_cache_hit = 0  # prompt tokens the radix cache held at its first admission (usage reports it)
        # Overlap: tokens sampled on the device that the host has not read yet.
        self.num_pending = 0
        # With params.prompt_logprobs: (logprob, top [(id, logprob)]) of prompt tokens 1, 2, ... as computed
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_ranks: list[int] = []  # and each of those tokens' rank (1: the likeliest token)

    @property
    def length(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output(self) -> int:
        return self.length - self.num_prompt

    @property
    def in_prefill(self) -> bool:
        """More than one position left to compute; with exactly one left, the next step is a decode."""
        return self.length - self.num_computed > 1

    def __repr__(self) -> str:
        return f"Sequence({self.rid}, {self.status.value}, len={self.length}, computed={self.num_computed})"
