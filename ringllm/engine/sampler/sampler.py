"""Sampling on the device for a whole batch at once: per-row parameters live in the row table
(engine/sampler/rows.py), indexed by request row, so no step loops over requests in Python. Greedy,
temperature, top-k, top-p, min-p, repetition / presence / frequency penalties, logit_bias, min_tokens,
allowed_token_ids, bad words, grammar masks (structured outputs), per-request seeds and logprobs.

Two paths. On CUDA, rows whose fields all sit at their neutral values sample in one fused Gumbel-max pass that
reads the kernel fields from the table itself (engine/kernels/sampling.py); where every row of the batch is
such a row (`RowTable.all_plain`), a step costs no per-row check at all. Any other row goes through the torch
math below (the reference, and the only path on other devices). Either way the tokens leave through the step's
ResultSink (engine/runner/result_sink.py).

A request with a seed draws its noise from a counter-based hash of (seed, output index, token id), so its
tokens do not depend on what else shares the batch. The others use one generator seeded from the config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ringllm.engine.kernels import available
from ringllm.engine.kernels import sampling as kernels
from ringllm.engine.sampler.rows import ADJUST, FILTER, KERNEL, LOGPROBS, PENALTY, ROW_FIELDS, RowTable

if TYPE_CHECKING:
    from ringllm.engine.runner.result_sink import ResultSink

_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit value
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB


def _hash_uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [n, vocab] from a splitmix64-style hash; int64 arithmetic wraps."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _M1 + counter[:, None] * _M2 + idx[None, :] * _M3
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    x = x * _M2
    x = x ^ ((x >> 29) & 0x7FFFFFFFF)
    x = x * _M3
    x = x ^ ((x >> 32) & 0xFFFFFFFF)
    return (((x >> 40) & 0xFFFFFF).float() + 0.5) / float(1 << 24)


class _RowParams(dict):
    """Per-row device parameters for one batch, gathered only when a stage asks for them."""

    def __init__(self, tensors: dict, rows: torch.Tensor):
        super().__init__()
        self.tensors, self.rows = tensors, rows

    def __missing__(self, name):
        value = self[name] = self.tensors[name][self.rows]
        return value


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] chosen token's logprob
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


@dataclass
class GrammarMask:
    """Token masks for some rows of a batch: `bitmask` [n, ceil(V / 32)] int32 on the device (bit j of a row set:
    token j allowed), `index` the batch positions of those n rows."""

    bitmask: torch.Tensor
    index: torch.Tensor


class Sampler:
    def __init__(
        self,
        table: RowTable,
        vocab_size: int,
        seed: int,
        req_tokens: torch.Tensor,
        eos_token_ids: Iterable[int] = (),
    ):
        """`table` has this sampler's device; `req_tokens` is the runner's request-token table (a penalised row
        reads its history there); `eos_token_ids` are what min_tokens bans besides a row's stop_token_ids."""
        assert table.device is not None, "the sampler's row table lives on its device"
        self.table = table
        self.vocab_size = vocab_size
        self.device = table.device
        self.req_tokens = req_tokens
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # On CUDA, plain rows sample in one fused Gumbel-max pass (kernels.sample_rows), which reads the kernel
        # fields of the table by request row (passed by name, so the kernel's signature must name each one).
        self.fused = available(torch.empty(0, device=self.device))
        self._kernel_tables = {f.name: table.dev[f.name] for f in ROW_FIELDS if f.stage == KERNEL}
        self._scratch = None  # the fused kernel's chunk winners, reused step after step
        if self.fused:
            n = kernels.sample_scratch_size(table.max_rows, vocab_size)
            self._scratch = (torch.empty(n, device=self.device), torch.empty(n, dtype=torch.int32, device=self.device))
        self._step_seed = seed * 1_000_003

    def reset(self) -> None:
        """The unseeded noise back to where it starts (the start-up warm-up draws none of a real request's)."""
        self.generator.manual_seed(self.seed)
        self._step_seed = self.seed * 1_000_003

    def __call__(
        self,
        logits: torch.Tensor,
        rows_host: np.ndarray,
        rows: torch.Tensor,
        seq_lens_host: np.ndarray,
        seq_lens: torch.Tensor,
        mask: GrammarMask | None,
        sink: ResultSink,
    ) -> None:
        """Samples one token per row of `logits` ([B, V], each batch entry's last position; request rows
        `rows_host`, on the device `rows`; `seq_lens` its known tokens once the step is computed, where the token
        goes) and writes it through `sink`. `mask` limits the rows of constrained requests to the tokens their
        grammar allows."""
        if self.fused and self.table.all_plain and mask is None:  # O(1): no per-row check
            tokens = self._fused(logits, rows, seq_lens, sink, final=True)
            if tokens is not None:
                sink.put(SampleResult(tokens))
            return
        values = self.table.batch(rows_host)
        params = _RowParams(self.table.dev, rows)
        raw = logits
        penalize = bool(RowTable.needs(PENALTY, values).any())
        if penalize or RowTable.needs(ADJUST, values).any() or mask is not None:
            history = self.req_tokens[rows, : int(seq_lens_host.max())] if penalize else None
            logits = self._adjust(logits, rows_host, values, params, history, seq_lens, mask)
        filtered = RowTable.needs(FILTER, values)
        if self.fused:
            tokens = self._fused(logits, rows, seq_lens, sink, final=not filtered.any())
            if tokens is None:
                return  # landed and packed by the kernel
            if filtered.any():
                idx = np.flatnonzero(filtered)
                sub = torch.from_numpy(idx).to(self.device)
                some = {n: a[idx] for n, a in values.items()}
                tokens[sub] = self._reference(
                    logits[sub].float(), some, _RowParams(self.table.dev, rows[sub]), seq_lens[sub]
                )
        else:
            tokens = self._reference(logits.float(), values, params, seq_lens)
        result = SampleResult(tokens)
        if RowTable.needs(LOGPROBS, values).any():
            lp = torch.log_softmax(raw.float(), dim=-1)
            result.logprobs = lp.gather(1, tokens[:, None]).squeeze(1)
            k = int(values["logprobs"].max())
            if k > 0:
                result.top_logprobs, result.top_ids = lp.topk(k, dim=-1)
        sink.put(result)

    def _fused(self, logits, rows, seq_lens, sink: ResultSink, final: bool) -> torch.Tensor | None:
        """The fused Gumbel-max pass over every row. Seeded rows draw from (seed, output index); the others from a
        per-step seed and their batch index. `final`: its tokens are the step's (no row needs the reference);
        then, where the sink takes a kernel's write (`kernel_target`), the kernel lands and packs them itself
        and this returns None; otherwise it returns the tokens."""
        self._step_seed += 1
        target = sink.kernel_target if final else None
        out = sink.token_buffer() if target is not None else None
        tokens, _ = kernels.sample_rows(
            logits, rows, seq_lens, self._step_seed, **self._kernel_tables, land=target, scratch=self._scratch, out=out
        )
        if target is None:
            return tokens
        sink.put_packed()
        return None

    def _reference(self, logits, values, params, seq_lens):
        greedy = logits.argmax(-1)
        if (values["temperature"] == 0).all():
            return greedy
        return torch.where(params["temperature"] == 0, greedy, self._sample(logits, values, params, seq_lens))

    def _adjust(self, logits, rows_host, values, params, history, seq_lens, mask: GrammarMask | None):
        """Penalties, logit_bias, min_tokens' banned stop tokens, allowed_token_ids, bad words, then grammar masks,
        on a float copy (logprobs
        come from the raw logits). NaN becomes -inf and +inf the largest float, so no row can turn the softmax
        into NaN."""
        out = logits.float()
        if history is not None:
            out = self._penalize(out, params, history, seq_lens)
        if out is logits:
            out = out.clone()
        if values["has_bias"].any():
            self._add_bias(out, rows_host, values)
        if (values["min_tokens"] > 0).any():
            self._ban_early_stops(out, rows_host, values, params, seq_lens)
        if values["has_allowed"].any():
            self._allow_only(out, rows_host, values)
        if values["has_bad_words"].any():
            self._ban_bad_words(out, rows_host, values, params, seq_lens)
        if mask is not None:
            import xgrammar  # only once a constrained request has come

            sub = out[mask.index]
            xgrammar.apply_token_bitmask_inplace(sub, mask.bitmask, vocab_size=self.vocab_size)
            out[mask.index] = sub
        return torch.nan_to_num_(out, nan=float("-inf"), posinf=torch.finfo(out.dtype).max, neginf=float("-inf"))

    def _add_bias(self, logits, rows_host, values) -> None:
        index = np.flatnonzero(values["has_bias"])
        maps = [self._params(rows_host[i]).logit_bias or {} for i in index]
        ids = [np.fromiter(m, np.int64, len(m)) for m in maps]
        biases = torch.from_numpy(np.concatenate([np.fromiter(m.values(), np.float32, len(m)) for m in maps]))
        at = torch.from_numpy(np.repeat(index, [len(x) for x in ids])).to(self.device)
        self._scatter_add(logits, at, ids, biases)

    def _ban_early_stops(self, logits, rows_host, values, params, seq_lens) -> None:
        """min_tokens: a row's stop tokens (its stop_token_ids, and EOS unless ignore_eos) get -inf while fewer
        than min_tokens of its outputs are out. The token sampled now is output seq_len - prompt_len; which rows
        are still short is decided on the device (no sync)."""
        index = np.flatnonzero(values["min_tokens"] > 0)
        ids = [self._stop_ids(self._params(rows_host[i])) for i in index]
        batch_rows = np.repeat(index, [len(x) for x in ids])
        if not len(batch_rows):
            return
        early = (seq_lens - params["prompt_len"]) < params["min_tokens"]
        at = torch.from_numpy(batch_rows).to(self.device)
        self._scatter_add(logits, at, ids, torch.where(early[at], float("-inf"), 0.0))

    def _allow_only(self, logits, rows_host, values) -> None:
        """allowed_token_ids: every token a row does not list gets -inf."""
        index = np.flatnonzero(values["has_allowed"])
        ids = [np.asarray(self._params(rows_host[i]).allowed_token_ids, dtype=np.int64) for i in index]
        banned = torch.full((len(index), logits.shape[1]), float("-inf"), device=self.device)
        local = torch.from_numpy(np.repeat(np.arange(len(index)), [len(x) for x in ids])).to(self.device)
        banned[local, torch.from_numpy(np.concatenate(ids)).to(self.device)] = 0.0
        logits[torch.from_numpy(index).to(self.device)] += banned

    def _ban_bad_words(self, logits, rows_host, values, params, seq_lens) -> None:
        """vLLM's bad words: a word's last token gets -inf where the row's output so far ends with the word's
        other tokens (a one-token word: always). Those tokens are read from the request-token table on the
        device (the last ones may still be in flight there), so a match is decided without a sync."""
        index = np.flatnonzero(values["has_bad_words"])
        words = [(i, w) for i in index for w in self._params(rows_host[i]).bad_words_token_ids or ()]
        width = max(len(w) for _, w in words) - 1
        prefix = np.full((len(words), max(width, 1)), -1, dtype=np.int64)
        for j, (_, w) in enumerate(words):
            prefix[j, : len(w) - 1] = w[:-1]
        at_host = np.array([i for i, _ in words], dtype=np.int64)
        at = torch.from_numpy(at_host).to(self.device)
        lens = torch.tensor([len(w) - 1 for _, w in words], device=self.device)
        start = seq_lens[at].long() - lens  # where the word's other tokens would begin (int32 on a decode step)
        pos = start[:, None] + torch.arange(prefix.shape[1], device=self.device)[None, :]
        where = (params.rows[at].long()[:, None], pos.clamp(0, self.req_tokens.shape[1] - 1))
        seen = self.req_tokens[where].long()
        inside = torch.arange(prefix.shape[1], device=self.device)[None, :] < lens[:, None]
        same = (seen == torch.from_numpy(prefix).to(self.device)) | ~inside
        # the word's other tokens must all be outputs (vLLM matches the output, not the prompt)
        match = same.all(1) & (start >= params["prompt_len"][at])
        last = [np.array([w[-1] for _, w in words], dtype=np.int64)]
        self._scatter_add(logits, at, last, torch.where(match, float("-inf"), 0.0))

    def _stop_ids(self, p) -> np.ndarray:
        eos = [] if p.ignore_eos else self.eos_token_ids
        return np.array(sorted(set(p.stop_token_ids or ()) | set(eos)), dtype=np.int64)

    def _params(self, row):
        p = self.table.params[int(row)]
        assert p is not None, f"request row {row} was never admitted"
        return p

    def _scatter_add(self, logits, at: torch.Tensor, ids: list[np.ndarray], values: torch.Tensor) -> None:
        """logits[at[j], ids[j]] += values[j] (`at` batch positions on the device, `ids` flattened)."""
        flat = torch.from_numpy(np.concatenate(ids)).to(self.device)
        logits.index_put_((at, flat), values.to(self.device), accumulate=True)

    def _penalize(self, logits, params, history, seq_lens):
        L = history.shape[1]
        pos = torch.arange(L, device=logits.device)[None, :]
        valid = pos < seq_lens[:, None]
        output = valid & (pos >= params["prompt_len"][:, None])
        ids = history.long().clamp_(0, self.vocab_size - 1)
        seen = torch.zeros_like(logits).scatter_add_(1, ids, valid.float()) > 0
        counts = torch.zeros_like(logits).scatter_add_(1, ids, output.float())
        rep = params["repetition_penalty"][:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        frequency, presence = params["frequency_penalty"][:, None], params["presence_penalty"][:, None]
        return logits - frequency * counts - presence * (counts > 0).float()

    def _sample(self, logits, values, params, seq_lens):
        logits = logits / params["temperature"].clamp(min=1e-5)[:, None]
        if (values["top_k"] > 0).any() or (values["top_p"] < 1).any():
            logits = self._top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        if (values["min_p"] > 0).any():
            floor = params["min_p"][:, None] * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < floor, torch.zeros_like(probs), probs)
        # Exponential-race sampling: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i.
        noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        if values["has_seed"].any():
            seeded = params["has_seed"]
            counter = seq_lens - params["prompt_len"]  # output index: the same token draws the same noise
            own = -torch.log(_hash_uniform(params["seed"], counter, probs.shape[1]))
            noise = torch.where(seeded[:, None], own, noise)
        return (probs / noise).argmax(-1)

    @staticmethod
    def _top_k_top_p(logits, params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
        k = torch.where(params["top_k"] > 0, params["top_k"], logits.shape[1])
        drop = rank >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
        drop = drop | (before >= params["top_p"][:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
