"""The engine's profiler (engine/profiler.py): an Engine built with profile=True writes a trace of rank 0."""

from ringllm.engine import EngineConfig, SamplingParams


def test_profile_writes_a_trace(tmp_path, demo_path):
    from ringllm.engine.engine import Engine
    from tests.helpers import run_engine

    engine = Engine(
        EngineConfig(
            model=str(demo_path),
            device="cpu",
            kv_cache_tokens=1024,
            context_len=128,
            profile=True,
            profile_dir=str(tmp_path),
        )
    )
    run_engine(engine, [[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))
    path = engine.stop_profile()
    assert path.is_file() and path.stat().st_size > 0 and "rank0" in path.name
