"""The batch-invariant FlashInfer backend's host-side planning, on the CPU: the empty entries that hold every
eager plan at FA2's 16-row query tile. The kernels themselves run in tests/engine/test_determinism_gpu.py."""

import numpy as np
import pytest

from ringllm.engine.attention.flashinfer_invariant import TILE_ROWS, fixed_tile_indptrs


def fa2_tile(qo_indptr: np.ndarray, group: int) -> int:
    """FlashInfer's choice of query tile for an eager FA2 plan (scheduler.cuh, FA2DetermineCtaTileQ, sm80+)."""
    mean = int(qo_indptr[-1]) * group // (len(qo_indptr) - 1)
    return 128 if mean > 64 else 64 if mean > 16 else 16


@pytest.mark.parametrize("group", [1, 2, 7, 16])
@pytest.mark.parametrize("lens", [[1], [1] * 300, [8192], [5, 1, 1, 700], [1, 2, 3, 1000, 1, 1]])
def test_every_eager_plan_gets_the_16_row_tile_and_only_empty_entries(lens, group):
    qo = np.concatenate([[0], np.cumsum(lens)])
    kv = np.concatenate([[0], np.cumsum([n + 11 for n in lens])])
    new_qo, new_kv = fixed_tile_indptrs(qo, kv, group)
    assert fa2_tile(new_qo, group) == TILE_ROWS
    assert np.array_equal(new_qo[: len(qo)], qo) and np.array_equal(new_kv[: len(kv)], kv)
    assert (new_qo[len(qo) :] == qo[-1]).all() and (new_kv[len(kv) :] == kv[-1]).all()
    if fa2_tile(qo, group) == TILE_ROWS:
        assert len(new_qo) == len(qo)  # nothing added where nothing is needed
