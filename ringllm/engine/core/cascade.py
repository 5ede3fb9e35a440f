"""Which decode rows attend to a shared prefix once (cascade attention), and when that pays: the grouping and
every threshold in one place, on the host, without torch.

When many decode rows continue the same cached prompt prefix (a system prompt, the radix cache holding it once),
plain decode attention reads that prefix's KV once per row. Cascade attention reads it once per group of rows
(level 0) and each row's own slots past it separately (level 1), merging the two by log-sum-exp
(engine/attention/cascade.py runs it on FlashInfer). Here: the scheduler groups a decode step's rows by the
radix node whose prefix they share (`group_by_shared_prefix`, into `StepPlan.shared_indptr` / `shared_lens`),
and the runner asks `worth_cascading` whether a step's groups save enough reads for the path it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ringllm.engine.core.radix_cache import Node
    from ringllm.engine.core.sequence import Sequence

# Shortest shared prefix worth a group (positions).
MIN_SHARED_PREFIX = 64
# The most groups a CUDA-graph cascade step takes: level 0 runs over this many fixed entries (unused ones
# empty). The scheduler keeps the groups that save the most; the rest of the rows go ungrouped.
MAX_GROUPS = 16
# An eager step runs cascade only when it saves at least this many KV positions' reads (over all rows): below
# it the two extra kernels per layer (level 0 and the merge) and the eager launch (no CUDA graph) cost more.
# 32k positions of Qwen3-0.6B are 3.8 GB (~0.9 ms at 4 TB/s); an estimate, not yet measured.
MIN_SAVED_TOKENS = 32768
# The same where the step replays a CUDA graph: no launch cost then, but level 0 and the merge take ~5-7 us a
# layer even when small (~200 us a step on Qwen3-0.6B's 28 layers), about 7k positions' reads of its KV
# (~115 KB each, all layers) at 4 TB/s. An estimate, not yet measured.
MIN_SAVED_TOKENS_GRAPH = 8192
# The smallest CUDA-graph bucket that gets a cascade graph: below 8 rows a step rarely saves
# MIN_SAVED_TOKENS_GRAPH reads.
CASCADE_MIN_BS = 8


def saved_tokens(shared_indptr: np.ndarray, shared_lens: np.ndarray) -> int:
    """KV positions a step's cascade does not read again: each group reads its prefix once, not size times."""
    sizes = np.diff(shared_indptr).astype(np.int64)
    return int(((sizes - 1) * shared_lens.astype(np.int64)).sum())


def worth_cascading(
    shared_indptr: np.ndarray, shared_lens: np.ndarray, in_graph: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """The groups a decode step should attend to by cascade, or None where plain decode is cheaper. A step
    replayed from a CUDA graph (`in_graph`) takes the first MAX_GROUPS groups (the scheduler orders them by reads
    saved; the rows past them go ungrouped) and pays from MIN_SAVED_TOKENS_GRAPH reads saved; an eager step
    takes every group and pays from MIN_SAVED_TOKENS."""
    if in_graph:
        shared_indptr, shared_lens = shared_indptr[: MAX_GROUPS + 1], shared_lens[:MAX_GROUPS]
    floor = MIN_SAVED_TOKENS_GRAPH if in_graph else MIN_SAVED_TOKENS
    if len(shared_lens) == 0 or saved_tokens(shared_indptr, shared_lens) < floor:
        return None
    return shared_indptr, shared_lens


def group_by_shared_prefix(
    seqs: list[Sequence], max_groups: int = MAX_GROUPS
) -> tuple[list[Sequence], tuple[np.ndarray, np.ndarray] | None]:
    """Decode sequences reordered so that those sharing a cached prefix are contiguous, grouped ones first (the
    rest keep their order), and the groups as (indptr, shared lengths); None when no group forms.

    Each sequence's cached prefix is the radix path down to its locked node, and its request row holds the
    tree's slots there. It joins the ancestor on that path that saves the most reads, (sequences below it - 1)
    x its depth, deepest on a tie: with 8 system prompts of 2,048 tokens, each followed by a unique question,
    every sequence joins its system prompt's node. A group is kept when it has 2 or more sequences and shares
    at least MIN_SHARED_PREFIX positions; at most `max_groups` groups are kept (a CUDA graph's cascade step
    takes that many), those saving the most reads, in that order, and the others' sequences go ungrouped."""
    paths, below = _paths_to_root(seqs)
    members: dict[Node, tuple[int, list[int]]] = {}  # chosen node -> (its depth, indices of its sequences)
    for i, path in enumerate(paths):
        best, best_saved = None, 0
        for node, depth in path:  # deepest first, so a tie keeps the deeper node
            saved = (below[node] - 1) * depth
            if saved > best_saved:
                best, best_saved = (node, depth), saved
        if best is not None and best[1] >= MIN_SHARED_PREFIX:
            members.setdefault(best[0], (best[1], []))[1].append(i)
    groups = [(depth, idx) for depth, idx in members.values() if len(idx) >= 2]
    groups.sort(key=lambda g: (len(g[1]) - 1) * g[0], reverse=True)  # stable: ties keep first-seen order
    del groups[max_groups:]
    if not groups:
        return seqs, None
    grouped = [i for _, idx in groups for i in idx]
    in_group = set(grouped)
    order = grouped + [i for i in range(len(seqs)) if i not in in_group]
    indptr = np.concatenate([[0], np.cumsum([len(idx) for _, idx in groups])]).astype(np.int32)
    lens = np.array([d for d, _ in groups], dtype=np.int32)
    return [seqs[i] for i in order], (indptr, lens)


def _paths_to_root(seqs: list[Sequence]) -> tuple[list[list[tuple[Node, int]]], dict[Node, int]]:
    """Per sequence, the radix nodes of its cached prefix with their depths, deepest first (the root left out);
    and how many of the sequences pass through each node (nodes hash by identity)."""
    paths: list[list[tuple[Node, int]]] = []
    below: dict[Node, int] = {}
    for seq in seqs:
        node, depth, path = seq.cache_node, seq.num_cached, []
        while node is not None and node.parent is not None:
            path.append((node, depth))
            below[node] = below.get(node, 0) + 1
            depth -= len(node.key)
            node = node.parent
        paths.append(path)
    return paths, below
