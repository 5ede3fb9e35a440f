"""ringllm's engine: `from engine import LLM, SamplingParams, EngineConfig`.

Imports are lazy so that torch-free parts (SamplingParams, the detokenizer) load without torch."""

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "SamplingParams", "configure_logging"]


def __getattr__(name):
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    if name in ("LLM", "Completion"):
        from engine import llm

        return getattr(llm, name)
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    if name == "configure_logging":
        from engine.logs import configure_logging

        return configure_logging
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
