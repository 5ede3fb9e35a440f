"""Which data-parallel replica (`--dp-size`) a request goes to: the one whose prefix cache most likely holds
the longest part of its prompt, as SGLang's cache-aware router decides, else the least loaded.

Each API worker keeps, per replica, the hashes of the token blocks of the prompts it sent there (block i's
hash chains blocks 0..i, so a hit on block i means the whole prefix up to it matched), in least-recently-
used order and bounded by the replica's KV capacity, since the replica's radix cache evicts in that order
too. It is an approximation: it does not see other API workers' requests, nor what the engine evicted
early; a wrong guess costs a prefill, never a wrong answer."""

from __future__ import annotations

from collections import OrderedDict

BLOCK_TOKENS = 16  # prompts are compared in blocks: one dict entry per 16 tokens keeps the index small
# A match counts when it covers this share of the prompt (SGLang's cache_threshold), or this many tokens:
# a long shared system prompt in front of a longer unique document is still worth its prefill.
MATCH_SHARE = 0.5
MATCH_TOKENS = 512
# The cache loses to the load when the replicas are this far apart in requests in flight from this worker
# (SGLang's balance_abs/rel thresholds): one hot prefix must not pile every request onto one replica.
IMBALANCE_ABS = 32
IMBALANCE_REL = 1.5


def block_hashes(ids: list[int]) -> list[int]:
    """One hash per whole block of `ids`, each over every token up to the block's end. Python hashes ints
    and tuples of ints the same in every process (no PYTHONHASHSEED salt), so API workers agree."""
    out, h = [], 0
    for end in range(BLOCK_TOKENS, len(ids) + 1, BLOCK_TOKENS):
        h = hash((h, tuple(ids[end - BLOCK_TOKENS : end])))
        out.append(h)
    return out


class PrefixIndex:
    """The block hashes sent to one replica, least recently used first, at most `capacity_blocks`."""

    def __init__(self, capacity_blocks: int):
        self.capacity = max(1, capacity_blocks)
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def matched_blocks(self, hashes: list[int]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def insert(self, hashes: list[int]) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class PrefixRouter:
    def __init__(self, num_replicas: int, capacity_tokens: int):
        self.indexes = [PrefixIndex(capacity_tokens // BLOCK_TOKENS) for _ in range(num_replicas)]

    def choose(self, ids: list[int], loads: list[int | None]) -> int:
        """The replica for prompt `ids`, given each replica's requests in flight (None: it cannot serve now;
        at least one can). Records the prompt as sent there."""
        hashes = block_hashes(ids)
        live = {r: load for r, load in enumerate(loads) if load is not None}  # replica -> its load
        best, matched = max(((r, self.indexes[r].matched_blocks(hashes)) for r in live), key=lambda x: x[1])
        least = min(live.values())
        most = max(live.values())
        imbalanced = most - least > IMBALANCE_ABS and most > IMBALANCE_REL * least
        tokens = matched * BLOCK_TOKENS
        if matched and not imbalanced and (tokens >= MATCH_SHARE * len(ids) or tokens >= MATCH_TOKENS):
            choice = best
        else:
            # The least loaded; among equals, by a hash of the prompt's start, so that every API worker sends
            # a new prefix to the same replica while the server is idle (round robin would let each worker
            # pick a different one, and the prefix would be prefilled and cached on both).
            idle = [r for r in live if loads[r] == least]
            choice = idle[hash(tuple(ids[:BLOCK_TOKENS])) % len(idle)]
        self.indexes[choice].insert(hashes)
        return choice
