"""SamplingParams for the engine and the offline API: the request contract declared once in ipc/sampling.py
(torch-free, so the API workers share it)."""

from ringllm.ipc.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    StructuredOutputs,
)

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_STOP_SEQUENCES",
    "MAX_STOP_TOKEN_IDS",
    "SamplingParams",
    "StructuredOutputs",
]
