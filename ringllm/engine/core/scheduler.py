"""Continuous batching over token-granular KV slots, first come first served or by priority.

Every step: each running sequence decodes one token, a sequence part-way through its prompt gets its next
chunk, and waiting sequences are admitted in arrival order while the token budget, the batch-size limit, the
request rows and the slots last. When slots run out for decodes, the radix cache gives back unlocked
prefixes first and then the most recently admitted sequence is preempted (its KV is dropped and recomputed
later; nothing is lost).

By priority (`--scheduling-policy priority`, vLLM's): the waiting queue is ordered by (priority, arrival), lower
first, and the sequence preempted is the running one last in that order, as vLLM does; a preempted sequence
goes back to its place in the queue.

The scheduler runs ahead of the device (overlap): a sequence whose last sampled token is still on the device
carries it as a placeholder (`num_pending`), so it is scheduled exactly once per step and never twice.

Under pipeline parallelism with p stages the running sequences form p micro-batch groups, and step k serves
group k mod p only: a sequence's next step then comes p steps after its last, by when the last stage has
sampled its token, so every stage has a different micro-batch to work on."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque

import numpy as np

from ringllm.engine.core.cascade import group_by_shared_prefix
from ringllm.engine.core.plan import Batch, StepPlan
from ringllm.engine.core.radix_cache import RadixCache
from ringllm.engine.core.sequence import Sequence, Status
from ringllm.engine.core.slots import SlotAllocator

_DEFER = -1  # _admit: skip this request for now, try the next


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_rows: int,
        context_len: int,
        max_bs: int,
        max_batched_tokens: int,
        use_radix_cache: bool,
        num_groups: int = 1,
        group_shared_prefixes: bool = False,
        by_priority: bool = False,
    ):
        self.allocator = SlotAllocator(num_slots)
        self.cache = RadixCache(self.allocator.free) if use_radix_cache else None
        # A sequence may grow to the context length, or to the whole pool if that is smaller: then a lone
        # sequence always gets its next slot, and preempting later arrivals always makes progress.
        self.max_seq_len = min(context_len, self.allocator.capacity)
        self.max_bs = max_bs
        self.max_batched_tokens = max_batched_tokens
        self.num_groups = num_groups
        # Order decode-only steps by shared cached prefix, for cascade attention (needs the radix cache).
        self.group_shared_prefixes = group_shared_prefixes and use_radix_cache
        self.group = 0  # the micro-batch group the next step serves
        self.req_to_slot = np.zeros((max_rows, context_len + 1), dtype=np.int32)  # host mirror of the device table
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.by_priority = by_priority
        self._arrivals = itertools.count()  # arrival order, the tie-break of equal priorities
        self._unsent: _Writes | None = None

    # ---- queue ----
    def add(self, seq: Sequence) -> None:
        seq.arrival_index = next(self._arrivals)
        if self.by_priority:
            bisect.insort(self.waiting, seq, key=_rank)
        else:
            self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is; its slots go back (or into the cache) at once. Device work already
        queued for it is ordered before any reuse of those slots, so this is safe while a step is in flight."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_slots_used(self) -> int:
        return self.allocator.capacity - self.allocator.num_free

    # ---- one step ----
    def schedule(self) -> Batch | None:
        group, self.group = self.group, (self.group + 1) % self.num_groups
        budget, chosen, spans = self.max_batched_tokens, [], []
        writes, self._unsent = self._unsent or _Writes(), None
        if self.cache is not None:
            for seq in self.running:
                if seq.num_cached < min(seq.num_computed, len(seq.token_ids), seq.num_prompt):
                    self._cache_prompt_prefix(seq, writes)
        decodes = self._decodes(group)[: min(budget, self.max_bs)]
        slots = self._alloc(len(decodes))
        shared = bulk = None
        if slots is not None:  # the common case: one allocation and one table write for every decode
            if self.group_shared_prefixes and len(decodes) > 1:
                # all are placed at once, so their order is free: rows sharing a cached prefix side by side
                decodes, shared = group_by_shared_prefix(decodes)
            rows = np.array([s.row for s in decodes], dtype=np.int32)
            pos = np.array([s.num_computed for s in decodes], dtype=np.int32)
            writes.add_one_each(rows, pos, slots, self.req_to_slot)
            bulk = (rows, pos)
            for seq in decodes:
                seq.num_computed += 1
            chosen += decodes
            spans += [1] * len(decodes)
            budget -= len(decodes)
            decodes = []
        if self.by_priority:  # the first in priority order get their slots first
            decodes.sort(key=_rank)
        for seq in decodes:  # short of slots: one at a time, evicting and preempting as needed
            if seq.status is not Status.RUNNING:
                continue  # preempted below for an earlier sequence's slot
            if not self._place(seq, 1, writes, chosen):
                continue
            chosen.append(seq)
            spans.append(1)
            budget -= 1
        num_decodes = len(chosen)
        placed = {id(s) for s in chosen}
        for seq in [s for s in self.running if s.in_prefill and s.group == group and id(s) not in placed]:
            if budget == 0 or len(chosen) == self.max_bs:
                break
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._place(seq, n, writes, chosen, preempt=False):
                break
            chosen.append(seq)
            spans.append(n)
            budget -= n
        for seq in list(self.waiting):
            if (
                budget == 0
                or len(chosen) == self.max_bs
                or not self.free_rows
                or len(self.running) >= self.max_bs * self.num_groups
            ):
                break
            n = self._admit(seq, budget, writes, chosen, group)
            if n == 0:
                break
            if n == _DEFER:
                continue
            self.waiting.remove(seq)
            chosen.append(seq)
            spans.append(n)
            budget -= n
        if not chosen:
            self._unsent = writes  # table writes still have to reach the device with the next plan
            return None
        # a decode-only step placed in bulk (batch-1 decode, its host cost counts) reuses the bulk's arrays
        plan = self._plan(chosen, spans, writes, bulk if num_decodes == len(chosen) else None)
        plan.num_decodes = num_decodes
        if shared is not None and num_decodes == len(chosen):  # cascade runs on decode-only steps
            plan.shared_indptr, plan.shared_lens = shared
        return Batch(chosen, plan)

    def _decodes(self, group: int) -> list[Sequence]:
        """The group's running sequences past their prompt that still need tokens (one that will surely end by
        length when its pending tokens arrive is not run again)."""
        return [
            s
            for s in self.running
            if s.group == group
            and not s.in_prefill
            and s.num_output < s.params.max_tokens
            and s.length < self.max_seq_len
        ]

    def _place(self, seq: Sequence, n: int, writes: _Writes, chosen: list, preempt: bool = True) -> bool:
        """Gives `seq` slots for its next n positions, evicting cache and preempting later sequences as
        needed. False if it cannot run this step (it may have been preempted itself)."""
        while (slots := self._alloc(n)) is None:
            if not preempt:
                return False
            victim = self._victim(chosen)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        writes.add(_row(seq), seq.num_computed, slots, self.req_to_slot)
        seq.num_computed += n
        return True

    def _victim(self, chosen: list) -> Sequence | None:
        """The running sequence to preempt: the last admitted, or by priority the last in priority order."""
        candidates = (s for s in reversed(self.running) if s not in chosen)
        return max(candidates, key=_rank, default=None) if self.by_priority else next(candidates, None)

    def _admit(self, seq: Sequence, budget: int, writes: _Writes, chosen: list, group: int) -> int:
        """Places a waiting sequence: a row, its cached prefix, and slots for its first chunk. Returns the
        chunk length; 0 if it must wait (and so must everything behind it); _DEFER if only it should wait."""
        if seq.num_pending:
            return 0  # preempted while a token was in flight: it rejoins once that token is known
        cached, node = np.empty(0, dtype=np.int32), None
        if self.cache is not None and seq.params.prompt_logprobs is not None:
            node = self.cache.root  # cached positions have no logits: such a request computes its whole prompt
        elif self.cache is not None:
            cached, node = self.cache.match_prefix(seq.token_ids[:-1])
            if self._prefix_in_progress(seq, len(cached)):
                return _DEFER
            self.cache.lock(node)
        n = min(len(seq.token_ids) - len(cached), budget)
        # Keep a slot for every running sequence's next decode, so admission does not force preemption.
        reserve = len(self.running)
        slots = self._alloc(n + reserve)
        if slots is None:
            if node is not None and self.cache is not None:  # a node comes from the cache
                self.cache.unlock(node)
            return 0
        self.allocator.free(slots[n:])
        seq.row, seq.group = self.free_rows.pop(), group
        seq.num_cached = seq.num_computed = len(cached)
        seq.cache_node = node
        if self.cache is not None:
            self.cache.record(len(seq.token_ids), len(cached))
        writes.add(seq.row, 0, np.concatenate([cached, slots[:n]]), self.req_to_slot)
        writes.add_tokens(seq.row, seq.token_ids)
        writes.admitted.append(seq)
        seq.num_computed += n
        seq.status = Status.RUNNING
        if seq.scheduled_at is None:  # a preempted request keeps its first admission time (and cache hit)
            seq.scheduled_at = time.monotonic()
            seq.prompt_cache_hit = min(len(cached), seq.num_prompt)
        self.running.append(seq)
        return n

    def _prefix_in_progress(self, seq: Sequence, matched: int) -> bool:
        """True if a running prefill is computing a longer prefix of `seq` than the cache holds: waiting a step
        for it costs less than computing the same positions twice."""
        want = seq.token_ids[: matched + 1]
        return any(
            p.num_cached <= matched < min(p.num_computed, p.num_prompt) and p.token_ids[: matched + 1] == want
            for p in self.running
        )

    def _alloc(self, n: int) -> np.ndarray | None:
        slots = self.allocator.alloc(n)
        if slots is None and self.cache is not None:
            self.cache.evict(n - self.allocator.num_free)
            slots = self.allocator.alloc(n)
        return slots

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        if self.by_priority:
            bisect.insort(self.waiting, seq, key=_rank)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _cache_prompt_prefix(self, seq: Sequence, writes: _Writes) -> None:
        """Puts the prompt positions computed so far into the radix cache while the sequence runs, so that
        requests admitted later share them at once. Earlier steps computed these positions, and any reader
        comes later on the same stream. Where the tree already held some of them, the sequence switches to
        the tree's slots and frees its own copies."""
        assert self.cache is not None and seq.cache_node is not None  # only with the radix cache
        k = min(seq.num_computed, len(seq.token_ids), seq.num_prompt)
        row = _row(seq)
        own = self.req_to_slot[row, :k].copy()
        already = self.cache.insert(seq.token_ids[:k], own)
        tree_slots, node = self.cache.match_prefix(seq.token_ids[:k])
        if already > seq.num_cached:
            self.allocator.free(own[seq.num_cached : already])
            writes.add(row, seq.num_cached, tree_slots[seq.num_cached : already], self.req_to_slot)
        self.cache.lock(node)
        self.cache.unlock(seq.cache_node)
        seq.cache_node, seq.num_cached = node, k

    def _release(self, seq: Sequence) -> None:
        """Gives back a sequence's row and slots; with the radix cache, the positions whose KV is known go into
        the tree instead, so a later request (or this one, recomputing) finds them."""
        row = _row(seq)
        slots = self.req_to_slot[row, : seq.num_computed].copy()
        keep = 0
        if self.cache is not None:
            assert seq.cache_node is not None  # admission locked its prefix (the root, at least)
            keep = min(seq.num_computed, len(seq.token_ids))
            already = self.cache.insert(seq.token_ids[:keep], slots[:keep])
            self.allocator.free(slots[seq.num_cached : already])
            self.cache.unlock(seq.cache_node)
        self.allocator.free(slots[keep:])
        self.free_rows.append(row)
        seq.row, seq.num_computed, seq.num_cached, seq.cache_node = None, 0, 0, None

    def _plan(self, seqs: list[Sequence], spans: list[int], writes: _Writes, decodes: tuple | None = None) -> StepPlan:
        """`decodes`: (rows, starts) when every sequence is a decode placed in bulk, in this order."""
        if decodes is not None:
            rows, starts = decodes
            lens = np.ones(len(seqs), dtype=np.int32)
        else:
            lens = np.array(spans, dtype=np.int32)
            rows = np.array([s.row for s in seqs], dtype=np.int32)
            starts = np.array([s.num_computed for s in seqs], dtype=np.int32) - lens
        sample = np.array([s.num_computed >= len(s.token_ids) for s in seqs], dtype=bool)
        for seq, keep in zip(seqs, sample):
            seq.num_pending += int(keep)
        return StepPlan(
            rows=rows,
            starts=starts,
            lens=lens,
            sample=sample,
            **writes.arrays(),
            new_rows=[_row(s) for s in writes.admitted],
            new_params=[s.params for s in writes.admitted],
            new_prompt_lens=[s.num_prompt for s in writes.admitted],
        )


def _rank(seq: Sequence) -> tuple[int, int]:
    """A sequence's place by priority: lower priority values first, then arrival."""
    return seq.params.priority, seq.arrival_index


def _row(seq: Sequence) -> int:
    """The request row of a sequence that holds one (running, or being placed)."""
    assert seq.row is not None, f"{seq} holds no request row"
    return seq.row


class _Writes:
    """Collects one step's writes into the request-to-slot and request-to-token tables."""

    def __init__(self):
        self.slot_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.token_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.admitted: list[Sequence] = []

    def add(self, row: int, start: int, slots: np.ndarray, table: np.ndarray) -> None:
        pos = np.arange(start, start + len(slots), dtype=np.int32)
        table[row, start : start + len(slots)] = slots
        self.slot_parts.append((np.full(len(slots), row, dtype=np.int32), pos, slots))

    def add_one_each(self, rows: np.ndarray, pos: np.ndarray, slots: np.ndarray, table: np.ndarray) -> None:
        """One slot for each of many rows (a batch of decodes)."""
        table[rows, pos] = slots
        self.slot_parts.append((rows, pos, slots))

    def add_tokens(self, row: int, tokens: list[int]) -> None:
        ids = np.asarray(tokens, dtype=np.int32)
        self.token_parts.append((np.full(len(ids), row, dtype=np.int32), np.arange(len(ids), dtype=np.int32), ids))

    def arrays(self) -> dict:
        def cat(parts, i):
            if len(parts) == 1:  # a decode-only step: one bulk write, nothing to join
                return parts[0][i]
            return np.concatenate([p[i] for p in parts]) if parts else np.empty(0, dtype=np.int32)

        return dict(
            slot_rows=cat(self.slot_parts, 0),
            slot_pos=cat(self.slot_parts, 1),
            slot_ids=cat(self.slot_parts, 2),
            token_rows=cat(self.token_parts, 0),
            token_pos=cat(self.token_parts, 1),
            token_ids=cat(self.token_parts, 2),
        )
