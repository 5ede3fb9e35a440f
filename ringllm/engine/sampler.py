"""Sampling on the device for a whole batch at once: per-row parameters live in tensors indexed by request
row, so no step loops over requests in Python. Greedy, temperature, top-k, top-p, min-p, repetition /
presence / frequency penalties, logit_bias, grammar masks (structured outputs), per-request seeds and logprobs.

A request with a seed draws its noise from a counter-based hash of (seed, output index, token id), so its
tokens do not depend on what else shares the batch. The others use one generator seeded from the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ringllm.engine import kernels
from ringllm.engine.kernels import sampling as sampling_kernels
from ringllm.engine.sampling_params import SamplingParams

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
    # [B, 1] float32, set when the fused sampler has packed the tokens (engine/step_result.py) and written
    # the kept ones back into the request-token table (the `land` of Sampler.__call__)
    packed: torch.Tensor | None = None


# The per-row tables, one entry each: name, dtype, the value of a request (its parameters and prompt length).
# Sampler.set_rows fills every table from this list; a host copy of each decides which stages a batch needs
# without a device sync.
ROW_FIELDS: list[tuple[str, torch.dtype, Callable[[SamplingParams, int], float | int | bool]]] = [
    ("temperature", torch.float32, lambda p, n: p.temperature),
    ("top_p", torch.float32, lambda p, n: p.top_p),
    ("top_k", torch.int64, lambda p, n: max(p.top_k, 0)),  # 0: off
    ("min_p", torch.float32, lambda p, n: p.min_p),
    ("rep", torch.float32, lambda p, n: p.repetition_penalty),
    ("presence", torch.float32, lambda p, n: p.presence_penalty),
    ("frequency", torch.float32, lambda p, n: p.frequency_penalty),
    ("seed", torch.int64, lambda p, n: p.seed if p.seed is not None else 0),
    ("has_seed", torch.bool, lambda p, n: p.seed is not None),
    ("prompt_len", torch.int64, lambda p, n: n),
    ("logprobs", torch.int64, lambda p, n: -1 if p.logprobs is None else p.logprobs),
    ("has_bias", torch.bool, lambda p, n: bool(p.logit_bias)),
]
_NUMPY = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}


@dataclass
class GrammarMask:
    """Token masks for some rows of a batch: `bitmask` [n, ceil(V / 32)] int32 on the device (bit j of a row set:
    token j allowed), `index` the batch positions of those n rows."""

    bitmask: torch.Tensor
    index: torch.Tensor


class Sampler:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.host: dict[str, np.ndarray] = {n: np.zeros(max_rows, dtype=_NUMPY[t]) for n, t, _ in ROW_FIELDS}
        self.dev = {n: torch.zeros(max_rows, device=device, dtype=t) for n, t, _ in ROW_FIELDS}
        # logit_bias is sparse: each row's (token ids, biases) stay on the host until a step has such a row.
        self.bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # On CUDA, rows without top-k/top-p/min-p sample in one fused Gumbel-max pass (kernels.sample_rows).
        self.fused = kernels.available(torch.empty(0, device=device))
        self._scratch = None  # the fused kernel's chunk winners, reused step after step
        if self.fused:
            n = sampling_kernels.sample_scratch_size(max_rows, vocab_size)
            self._scratch = (torch.empty(n, device=device), torch.empty(n, dtype=torch.int32, device=device))
        self._step_seed = seed * 1_000_003
        # Whether every row set so far samples plainly (no penalty, logit_bias, top-k/p, min-p or logprobs):
        # then a step skips the host checks of which stages it needs (batch-1 decode is host-bound).
        self._was_set = np.zeros(max_rows, dtype=bool)
        self.all_plain = True

    def set_rows(self, rows: list[int], params: list[SamplingParams], prompt_lens: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.int64).to(self.device)
        for name, dtype, value in ROW_FIELDS:
            vals = [value(p, n) for p, n in zip(params, prompt_lens)]
            self.host[name][rows] = vals
            self.dev[name][index] = torch.tensor(vals, dtype=dtype).to(self.device)
        for row, p in zip(rows, params):
            if p.logit_bias:
                self.bias[row] = (np.fromiter(p.logit_bias, np.int64), np.fromiter(p.logit_bias.values(), np.float32))
            else:
                self.bias.pop(row, None)
        self._was_set[rows] = True
        self.all_plain = not self._special(np.flatnonzero(self._was_set)).any()

    def _special(self, rows: np.ndarray) -> np.ndarray:
        """Which of these rows need more than the fused Gumbel-max pass."""
        h = {n: a[rows] for n, a in self.host.items()}
        return (
            (h["rep"] != 1)
            | (h["presence"] != 0)
            | (h["frequency"] != 0)
            | h["has_bias"]
            | (h["top_k"] > 0)
            | (h["top_p"] < 1)
            | (h["min_p"] > 0)
            | (h["logprobs"] >= 0)
        )

    def __call__(
        self,
        logits: torch.Tensor,
        rows_host: np.ndarray,
        rows: torch.Tensor,
        history: torch.Tensor | None,
        seq_lens: torch.Tensor,
        mask: GrammarMask | None = None,
        land: tuple[torch.Tensor, torch.Tensor] | None = None,
        out: torch.Tensor | None = None,
    ) -> SampleResult:
        """logits: [B, V] for the last position of each row. `history` ([B, L] token ids, L >= max seq_len) is
        needed only when a row has penalties; `seq_lens` [B] counts each row's known tokens; `mask` limits the
        rows of constrained requests to the tokens their grammar allows. `land` = (req_tokens, keep [B] flags):
        where the fused kernel gives every row its final token, it also writes the kept rows' tokens to
        req_tokens[row, seq_len] and packs them (result.packed); otherwise the caller does both. `out`: where
        such a packed result goes when every row is plain ([B, 1] float32, possibly pinned host memory: the
        caller then finds result.packed is out)."""
        if self.fused and self.all_plain and mask is None:
            tokens, packed = self._fused(logits, rows, seq_lens, land, out if land is not None else None)
            return SampleResult(tokens, packed=packed if land is not None else None)
        h = {n: a[rows_host] for n, a in self.host.items()}
        p = _RowParams(self.dev, rows)
        raw = logits
        penalize = self.needs_history(rows_host)
        if penalize or h["has_bias"].any() or mask is not None:
            logits = self._adjust(logits, rows_host, h, p, history if penalize else None, seq_lens, mask)
        filtered = (h["top_k"] > 0) | (h["top_p"] < 1) | (h["min_p"] > 0)
        any_filtered = bool(filtered.any())
        packed = None  # set only where the fused kernel's tokens are final, and so were landed
        if self.fused:
            tokens, packed = self._fused(logits, rows, seq_lens, None if any_filtered else land)
            if any_filtered:
                idx = np.flatnonzero(filtered)
                sub = torch.from_numpy(idx).to(self.device)
                tokens[sub] = self._reference(
                    logits[sub].float(),
                    {n: a[idx] for n, a in h.items()},
                    _RowParams(self.dev, rows[sub]),
                    seq_lens[sub],
                )
        else:
            tokens = self._reference(logits.float(), h, p, seq_lens)
        result = SampleResult(tokens, packed=packed if land is not None and not any_filtered else None)
        if (h["logprobs"] >= 0).any():
            lp = torch.log_softmax(raw.float(), dim=-1)
            result.logprobs = lp.gather(1, tokens[:, None]).squeeze(1)
            k = int(h["logprobs"].max())
            if k > 0:
                result.top_logprobs, result.top_ids = lp.topk(k, dim=-1)
        return result

    def needs_history(self, rows_host: np.ndarray) -> bool:
        """Whether any of these rows has a penalty, and so needs its token history."""
        if self.all_plain:
            return False
        h = self.host
        return bool(
            (h["rep"][rows_host] != 1).any()
            or (h["presence"][rows_host] != 0).any()
            or (h["frequency"][rows_host] != 0).any()
        )

    def _reference(self, logits, h, p, seq_lens):
        greedy = logits.argmax(-1)
        if (h["temperature"] == 0).all():
            return greedy
        return torch.where(p["temperature"] == 0, greedy, self._sample(logits, h, p, seq_lens))

    def _fused(self, logits, rows, seq_lens, land, out=None):
        """Seeded rows draw from (seed, output index); the others from a per-step seed and their batch index.
        The kernel reads the rows' parameters from the tables itself (no per-step gathers)."""
        self._step_seed += 1
        d = self.dev
        tables = (d["temperature"], d["seed"], d["has_seed"], d["prompt_len"])
        return sampling_kernels.sample_rows(logits, rows, seq_lens, self._step_seed, *tables, land, self._scratch, out)

    def _adjust(self, logits, rows_host, h, p, history, seq_lens, mask: GrammarMask | None):
        """Penalties, then logit_bias, then grammar masks, on a float copy (logprobs come from the raw logits).
        NaN becomes -inf and +inf the largest float, so no row can turn the softmax into NaN."""
        out = logits.float()
        if history is not None:
            out = self._penalize(out, p, history, seq_lens)
        if out is logits:
            out = out.clone()
        if h["has_bias"].any():
            self._add_bias(out, rows_host, h)
        if mask is not None:
            import xgrammar  # only once a constrained request has come

            sub = out[mask.index]
            xgrammar.apply_token_bitmask_inplace(sub, mask.bitmask, vocab_size=self.vocab_size)
            out[mask.index] = sub
        return torch.nan_to_num_(out, nan=float("-inf"), posinf=torch.finfo(out.dtype).max, neginf=float("-inf"))

    def _add_bias(self, logits, rows_host, h) -> None:
        index = np.flatnonzero(h["has_bias"])
        biases = [self.bias[int(rows_host[i])] for i in index]
        batch_rows = np.repeat(index, [len(ids) for ids, _ in biases])
        ids = np.concatenate([ids for ids, _ in biases])
        values = np.concatenate([v for _, v in biases])
        to = self.device
        logits.index_put_(
            (torch.from_numpy(batch_rows).to(to), torch.from_numpy(ids).to(to)),
            torch.from_numpy(values).to(to),
            accumulate=True,
        )

    def _penalize(self, logits, p, history, seq_lens):
        L = history.shape[1]
        pos = torch.arange(L, device=logits.device)[None, :]
        valid = pos < seq_lens[:, None]
        output = valid & (pos >= p["prompt_len"][:, None])
        ids = history.long().clamp_(0, self.vocab_size - 1)
        seen = torch.zeros_like(logits).scatter_add_(1, ids, valid.float()) > 0
        counts = torch.zeros_like(logits).scatter_add_(1, ids, output.float())
        rep = p["rep"][:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - p["frequency"][:, None] * counts - p["presence"][:, None] * (counts > 0).float()

    def _sample(self, logits, h, p, seq_lens):
        logits = logits / p["temperature"].clamp(min=1e-5)[:, None]
        if (h["top_k"] > 0).any() or (h["top_p"] < 1).any():
            logits = self._top_k_top_p(logits, p)
        probs = torch.softmax(logits, dim=-1)
        if (h["min_p"] > 0).any():
            floor = p["min_p"][:, None] * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < floor, torch.zeros_like(probs), probs)
        # Exponential-race sampling: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i.
        noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        if h["has_seed"].any():
            seeded = p["has_seed"]
            counter = seq_lens - p["prompt_len"]  # output index: the same token draws the same noise
            own = -torch.log(_hash_uniform(p["seed"], counter, probs.shape[1]))
            noise = torch.where(seeded[:, None], own, noise)
        return (probs / noise).argmax(-1)

    @staticmethod
    def _top_k_top_p(logits, p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
        k = torch.where(p["top_k"] > 0, p["top_k"], logits.shape[1])
        drop = rank >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
        drop = drop | (before >= p["top_p"][:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
