"""The prefix-affinity router over data-parallel replicas (app/router.py): a shared prefix stays on its replica,
load wins when replicas are far apart or nothing meaningful matches, and a replica that cannot serve is skipped.
The router behind a real --dp-size 2 server: tests/e2e/test_data_parallel.py."""

from __future__ import annotations

from ringllm.app.router import BLOCK_TOKENS, PrefixRouter

SHARED = [(7 * i) % 1000 + 3 for i in range(96)]  # a 96-token prefix (6 router blocks) several prompts share


# ---- the router alone ----
def test_router_prefers_the_replica_holding_the_prefix():
    router = PrefixRouter(2, capacity_tokens=1 << 16)
    first = router.choose(SHARED + [1] * 8, [0, 0])
    assert all(router.choose(SHARED + [k] * 8, [0, 0]) == first for k in range(2, 6))
    # The same prefix while the replica holding it has more requests in flight, within the balance bound.
    loads = [5, 5]
    loads[first] = 9
    assert router.choose(SHARED + [9] * 8, loads) == first


def test_router_takes_the_least_loaded_without_a_meaningful_match():
    router = PrefixRouter(2, capacity_tokens=1 << 16)
    holder = router.choose(SHARED[:16] + [1] * 200, [0, 0])
    other = 1 - holder
    loads = [0, 0]
    loads[holder] = 1
    # 16 matched tokens of 216 is no meaningful share: the idle replica takes it.
    assert router.choose(SHARED[:16] + [2] * 200, loads) == other


def test_router_load_beats_the_cache_when_replicas_are_far_apart():
    router = PrefixRouter(2, capacity_tokens=1 << 16)
    holder = router.choose(SHARED, [0, 0])
    loads = [0, 0]
    loads[holder] = 100
    assert router.choose(SHARED, loads) == 1 - holder


def test_router_skips_a_replica_that_cannot_serve_and_forgets_past_capacity():
    router = PrefixRouter(2, capacity_tokens=4 * BLOCK_TOKENS)
    holder = router.choose(SHARED, [0, 0])
    down = [0, 0]
    down[holder] = None
    assert router.choose(SHARED, down) == 1 - holder
    assert len(router.indexes[holder].blocks) == 4  # the oldest blocks were dropped, as the engine evicts
