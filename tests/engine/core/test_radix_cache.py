"""RadixCache against a naive model, under random operation sequences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringllm.engine.core.radix_cache import RadixCache
from ringllm.engine.core.slots import SlotAllocator

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)
ops = st.lists(
    st.tuples(st.sampled_from(["insert", "match_lock", "unlock", "evict"]), tokens, st.integers(1, 30)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_radix_cache_against_naive_model(operations):
    alloc = SlotAllocator(200)
    cache = RadixCache(alloc.free)
    mapping: dict[tuple, int] = {}  # naive model: every cached prefix -> slot of its last token
    locked: list[tuple] = []  # (prefix, node) pairs a "request" holds
    for op, seq, n in operations:
        if op == "insert":
            slots = alloc.alloc(len(seq))
            if slots is None:
                continue
            already = cache.insert(seq, slots)
            for i in range(len(seq)):
                key = tuple(seq[: i + 1])
                if i < already:
                    assert key in mapping
                else:
                    assert key not in mapping
                    mapping[key] = int(slots[i])
            alloc.free(slots[:already])  # duplicates go back, as the scheduler does
        elif op == "match_lock":
            slots, node = cache.match_prefix(seq)
            m = len(slots)
            assert all(mapping[tuple(seq[: i + 1])] == int(slots[i]) for i in range(m))
            assert m == len(seq) or tuple(seq[: m + 1]) not in mapping  # longest match
            cache.lock(node)
            locked.append((tuple(seq[:m]), node))
        elif op == "unlock" and locked:
            _, node = locked.pop(n % len(locked))
            cache.unlock(node)
        elif op == "evict":
            cache.evict(n)
            for key in list(mapping):
                if cache.match_prefix(list(key))[0].size < len(key):
                    del mapping[key]
        # Invariants: locked prefixes stay whole; no slot is lost or held twice.
        for prefix, _ in locked:
            assert cache.match_prefix(list(prefix))[0].size == len(prefix)
        held = sorted(mapping.values())
        assert len(held) == len(set(held)) == cache.cached_tokens
        free = alloc.free_slots().tolist()
        assert sorted(held + free) == list(range(1, 200))
        assert 0 <= cache.evictable_tokens <= cache.cached_tokens
    for _, node in locked:
        cache.unlock(node)
    assert cache.evictable_tokens == cache.cached_tokens
    cache.reset()
    assert alloc.num_free == alloc.capacity


def test_split_and_hit_statistics():
    alloc = SlotAllocator(100)
    cache = RadixCache(alloc.free)
    a = alloc.alloc(6)
    assert cache.insert([1, 2, 3, 4, 5, 6], a) == 0
    slots, node = cache.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == a[:3].tolist()  # the edge was split after 3 tokens
    cache.record(4, 3)
    assert cache.hit_rate == 0.75
    cache.lock(node)
    assert cache.evict(100) == 3  # only the unlocked tail [4, 5, 6] can go
    assert cache.match_prefix([1, 2, 3])[0].size == 3
    cache.unlock(node)
    assert cache.evict(100) == 3
    assert alloc.num_free == alloc.capacity


def test_allocator_never_hands_out_a_slot_twice():
    alloc = SlotAllocator(10)
    a, b = alloc.alloc(4), alloc.alloc(5)
    assert alloc.alloc(1) is None
    assert len(set(a.tolist()) | set(b.tolist())) == 9 and 0 not in a.tolist() + b.tolist()
    alloc.free(a)
    c = alloc.alloc(4)
    assert sorted(c.tolist()) == sorted(a.tolist())
    alloc.free(b), alloc.free(c)
    with pytest.raises(RuntimeError, match="more slots freed"):
        alloc.free(np.array([1], dtype=np.int32))
