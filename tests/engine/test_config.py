"""EngineConfig (engine/config.py) refuses values out of their range when it is built."""

import pytest

from ringllm.engine import EngineConfig


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError):
        EngineConfig(max_bs=0)
    with pytest.raises(ValueError):
        EngineConfig(gpu_memory_utilization=1.5)
