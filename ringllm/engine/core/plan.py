"""What the scheduler hands the model runner for one step (`StepPlan`), and the batch it came from.

The plan is a msgspec Struct whose fields are the one declaration of what a step carries: the worker
processes of a parallel engine receive it encoded field by field (engine/worker.py, with the array hooks
below), so a field added here travels without another list to keep in step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from ringllm.engine.core.sequence import Sequence
from ringllm.engine.sampling_params import SamplingParams


def _no_groups() -> np.ndarray:
    return np.zeros(1, dtype=np.int32)


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int32)


class StepPlan(msgspec.Struct, kw_only=True, tag="plan"):
    """What the model runner needs for one step, and only what changed since the last: the slots and token
    ids of newly placed positions and the parameters of newly admitted rows. Plain arrays, so that it can be
    sent to worker processes as is."""

    rows: np.ndarray  # [B] request row of each scheduled sequence
    starts: np.ndarray  # [B] first position computed this step
    lens: np.ndarray  # [B] positions computed this step
    sample: np.ndarray  # [B] bool: this step's last position yields a token that is kept
    slot_rows: np.ndarray = msgspec.field(default_factory=_empty)  # flat writes into the request-to-slot table
    slot_pos: np.ndarray = msgspec.field(default_factory=_empty)
    slot_ids: np.ndarray = msgspec.field(default_factory=_empty)
    # flat writes into the request-to-token table (tokens known on the host)
    token_rows: np.ndarray = msgspec.field(default_factory=_empty)
    token_pos: np.ndarray = msgspec.field(default_factory=_empty)
    token_ids: np.ndarray = msgspec.field(default_factory=_empty)
    new_rows: list[int] = []  # rows admitted this step, with their parameters
    new_params: list[SamplingParams] = []
    new_prompt_lens: list[int] = []
    num_decodes: int = 0  # the first num_decodes sequences decode; the rest compute prompt positions
    # Decode steps with shared cached prefixes (engine/core/cascade.py): decode rows
    # [shared_indptr[g], shared_indptr[g+1]) all start with the same shared_lens[g] cached slots.
    shared_indptr: np.ndarray = msgspec.field(default_factory=_no_groups)
    shared_lens: np.ndarray = msgspec.field(default_factory=_empty)

    @property
    def is_decode(self) -> bool:
        return bool((self.lens == 1).all())

    @property
    def num_tokens(self) -> int:
        return int(self.lens.sum())


@dataclass
class Batch:
    seqs: list[Sequence]
    plan: StepPlan


# ---- on the wire (engine/worker.py): arrays as (dtype, bytes), everything else as msgspec encodes it ----
def array_enc_hook(obj: Any) -> Any:
    """msgspec's enc_hook for a plan's arrays."""
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, np.ascontiguousarray(obj).tobytes())
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def array_dec_hook(kind: type, obj: Any) -> Any:
    """msgspec's dec_hook for a plan's arrays."""
    if kind is np.ndarray:
        dtype, data = obj
        return np.frombuffer(data, dtype=np.dtype(dtype))
    raise NotImplementedError(f"cannot decode {kind}")
