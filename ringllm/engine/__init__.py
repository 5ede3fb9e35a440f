"""ringllm's engine: `from ringllm.engine import LLM, SamplingParams, EngineConfig`.

Imports are lazy so that torch-free parts (SamplingParams, EngineConfig) load without torch."""

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "SamplingParams", "configure_logging"]


def __getattr__(name):
    if name == "SamplingParams":
        from ringllm.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from ringllm.engine.config import EngineConfig

        return EngineConfig
    if name in ("LLM", "Completion"):
        from ringllm.engine import llm

        return getattr(llm, name)
    if name == "Engine":
        from ringllm.engine.engine import Engine

        return Engine
    if name == "configure_logging":
        from ringllm.engine.logs import configure_logging

        return configure_logging
    raise AttributeError(f"module ringllm.engine has no attribute {name!r}")
