"""The sampler: every request row's sampling fields in one table (rows.py) and the math over a whole batch
(sampler.py), with a fused Gumbel-max pass on CUDA for the rows that need nothing more.

Adding a sampling field (min_tokens was added exactly so):
1. the contract: declare it with its bounds in ringllm/ipc/sampling.py (SamplingFields if an OpenAI body
   carries it as is); it then reaches the HTTP schema, the ring messages, the worker plans and the offline API;
2. the sampler: one entry in rows.py's ROW_FIELDS (its column, the parameter it reads, its stage and its
   neutral value: the value at which the fused pass is exact), and the math in sampler.py for its stage;
   whether a row leaves the fused pass is derived from the entry, so nothing else is listed by hand;
3. a test. tests/ipc/test_sampling.py fails for a field that no row reads and NOT_SAMPLED does not name, and for
   a non-neutral value that the fused path would ignore."""

from ringllm.engine.sampler.rows import NOT_SAMPLED, ROW_FIELDS, RowField, RowTable
from ringllm.engine.sampler.sampler import GrammarMask, Sampler, SampleResult

__all__ = ["NOT_SAMPLED", "ROW_FIELDS", "GrammarMask", "RowField", "RowTable", "SampleResult", "Sampler"]
