"""GGUF checkpoints (llama.cpp's one-file format) seen as a Hugging Face checkpoint: the metadata as a
config.json dict, the tokenizer as tokenizer.json + tokenizer_config.json (built with transformers' own GGUF
tokenizer conversion), and the tensors dequantized to float32 under Hugging Face names. Reading and
dequantizing go through the maintained `gguf` package (numpy). No torch here: API workers build their
tokenizer from this module."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ringllm.engine.cache_dir import cache_root as default_cache_root

# GGUF `general.architecture` -> the class ringllm serves it with.
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

# GGUF tensor names -> Hugging Face names (llama.cpp's "standardized tensor names"; the same for the three).
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED = {"rope_freqs.weight"}  # read into the config (Llama 3 rope scaling), not a model parameter
TOKENIZER_FILES_VERSION = 2  # in the tokenizer cache's key: a change in how the files are built rebuilds them


class GGUFError(ValueError):
    """A GGUF file ringllm cannot serve (the message says why)."""


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def find_gguf(directory: Path) -> Path | None:
    """The one .gguf file in a directory (None if there is none; an error if there are several)."""
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise GGUFError(
            f"{directory} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
            "pass --model the one to serve"
        )
    return found[0] if found else None


@functools.cache
def _reader_class() -> type:
    """The gguf package's GGUFReader, seeing its memory map as a plain ndarray (a view of the same pages, which
    keeps the map open). Opening a file slices the map once per metadata item, ~3 million slices for a 151k-token
    vocabulary, and a slice of an np.memmap is an np.memmap, whose bookkeeping on every slice was most of the time
    to open one: 0.5B Q4_K_M on a 2-core CPU box, 6.9 s before, ~2 s now, at every engine start."""
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        @property
        def data(self) -> Any:  # a plain ndarray where GGUFReader declares its np.memmap
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = value.view(np.ndarray)

    return PlainReader


class GGUFFile:
    """One opened file: its metadata and its tensors (memory-mapped, read when dequantized)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = _reader_class()(str(path))
        except Exception as e:  # a truncated or foreign file: the reader's own message names the problem
            raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.meta = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise GGUFError(
                f"{path}: GGUF architecture {arch!r} is not supported; ringllm serves {', '.join(ARCHITECTURES)}"
            )
        self.arch: str = arch

    def _get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    # ---- config ----
    def config(self) -> dict:
        """The Hugging Face config.json this file's metadata describes."""
        heads = self._get("attention.head_count")
        hidden = self._get("embedding_length")
        names = {t.name for t in self.reader.tensors}
        tokens = self.meta.get("tokenizer.ggml.tokens") or []
        cfg = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self._get("vocab_size") or len(tokens),
            "hidden_size": hidden,
            "intermediate_size": self._get("feed_forward_length"),
            "num_hidden_layers": self._get("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._get("attention.head_count_kv", heads),
            "head_dim": self._get("attention.key_length") or hidden // heads,
            "rms_norm_eps": self._get("attention.layer_norm_rms_epsilon", 1e-6),
            "max_position_embeddings": self._get("context_length", 4096),
            "rope_theta": self._get("rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta.get("tokenizer.ggml.eos_token_id"),
        }
        missing = [k for k, v in cfg.items() if v is None and k not in ("bos_token_id", "eos_token_id")]
        if missing:
            raise GGUFError(f"{self.path} lacks the metadata for {', '.join(missing)}")
        scaling = self._get("rope.scaling.type")
        if scaling not in (None, "none"):
            raise GGUFError(f"{self.path}: rope scaling {scaling!r} is not supported (plain and Llama 3 rope are)")
        if "rope_freqs.weight" in names:
            cfg["rope_scaling"] = _llama3_rope(
                self.tensor("rope_freqs.weight"), cfg["rope_theta"], cfg["head_dim"], self.path
            )
        return cfg

    # ---- tensors ----
    def tensor(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = next(t for t in self.reader.tensors if t.name == name)
        return dequantize(t.data, t.tensor_type)

    def check_tensor_types(self) -> None:
        """Fails before any loading if a tensor is stored in a type the gguf package cannot dequantize."""
        from gguf.quants import dequantize

        seen: dict = {}
        for t in self.reader.tensors:
            if t.tensor_type in seen:
                continue
            try:
                dequantize(t.data[:1], t.tensor_type)
                seen[t.tensor_type] = True
            except (NotImplementedError, ValueError) as e:
                raise GGUFError(
                    f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which "
                    f"cannot be dequantized here ({e})"
                ) from None

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def hf_tensors(self, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array) for every tensor, dequantized one at a time. Each array is valid
        until the next one is asked for: copy it first (the engine copies it into its parameter)."""
        self.check_tensor_types()
        buffer = _Buffer()
        for t in self.reader.tensors:
            if t.name in _IGNORED:
                continue
            name = hf_name(t.name, self.path)
            w = buffer.dequantize(t.data, t.tensor_type)
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                heads = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
                w = unpermute_qk(w, heads)
            yield name, w


class _Buffer:
    """Dequantizes tensors a few MB of rows at a time into one float32 buffer that grows to the largest tensor
    and is reused for every other. gguf's dequantize of a whole tensor allocates its result and as much again in
    pieces, new pages each time: a 0.5B model's 630M float32 values cost ~2.4 GB of page faults more than this
    (seconds of system time at every engine start on a 2-core VM)."""

    CHUNK_BYTES = 4 << 20

    def __init__(self) -> None:
        self.flat = np.empty(0, dtype=np.float32)

    def dequantize(self, data: np.ndarray, qtype) -> np.ndarray:
        from gguf.quants import dequantize

        if data.ndim < 2 or data.shape[0] < 2:
            return dequantize(data, qtype)
        first = dequantize(data[:1], qtype)  # one row: the float shape of a row of `data`
        shape = (data.shape[0], *first.shape[1:])
        size = int(np.prod(shape))
        if self.flat.size < size:
            self.flat = np.empty(0, dtype=np.float32)  # the old pages go before the new are touched
            self.flat = np.empty(size, dtype=np.float32)
        out = self.flat[:size].reshape(shape)
        step = max(1, self.CHUNK_BYTES // max(1, first.nbytes))
        for start in range(0, shape[0], step):
            out[start : start + step] = dequantize(data[start : start + step], qtype)
        return out


def hf_name(gguf_name: str, path: Path | str = "") -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    raise GGUFError(f"{path}: tensor {gguf_name!r} has no counterpart in the models ringllm serves")


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation for llama-family files. Its converter reorders each head's rows
    from rotate-half order (first half, second half) to interleaved pairs, for its GPT-J style rope kernel:
    `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`. The inverse reshapes to (heads, d/2, 2) and swaps back."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope(freq_factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict:
    """Llama 3's rope scaling from the per-frequency divisors llama.cpp stores as `rope_freqs.weight`.
    llama.cpp computed them from the Hugging Face config's four numbers; those are recovered by recomputing
    the divisors for the usual values and keeping the set that reproduces the file exactly."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv
    factor = float(freq_factors.max())
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 1024, 512, 256, 128, 64):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            smooth = (old_ctx / wavelen - low) / (high - low)
            want = np.where(
                wavelen < old_ctx / high,
                1.0,
                np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
            )
            if np.allclose(want, freq_factors, rtol=1e-4, atol=1e-5):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": old_ctx,
                }
    raise GGUFError(f"{path}: its rope_freqs tensor matches no Llama 3 rope scaling ringllm knows")


# ---- the tokenizer, as files the app and transformers read ----
@functools.lru_cache(maxsize=2)
def open_gguf(path: Path, _stamp: tuple = ()) -> GGUFFile:
    """Opening parses ~300k metadata entries (seconds), so the engine's config and weight reads share one."""
    return GGUFFile(path)


def opened(path: Path) -> GGUFFile:
    st = path.stat()
    return open_gguf(path.resolve(), (st.st_size, st.st_mtime_ns))


def tokenizer_dir(path: Path, cache_root: Path | None = None) -> Path:
    """A directory holding tokenizer.json and tokenizer_config.json (with the chat template) built from the
    GGUF file's own tokenizer metadata; built once per file and cached, since reading the file takes
    seconds."""
    st = path.stat()
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{TOKENIZER_FILES_VERSION}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    root = Path(cache_root) if cache_root else default_cache_root()
    out = root / "gguf-tokenizers" / key
    if (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        write_tokenizer_files(opened(path), tmp)
        os.rename(tmp, out)  # atomic: a reader sees no directory or a whole one
    except OSError:
        if not (out / "tokenizer.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tokenizer_files(f: GGUFFile, out: Path) -> None:
    """What transformers' `from_pretrained(..., gguf_file=...)` builds, saved as a tokenizer directory."""
    try:  # transformers >= 5.x
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x (mypy checks against the installed 5.x, which moved these names)
        from transformers.integrations.ggml import (  # type: ignore[attr-defined,no-redef]
            convert_gguf_tokenizer,
        )
        from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

        _M: Any = GGUF_TO_TRANSFORMERS_MAPPING

        GGUF_TOKENIZER_MAPPING = {
            "tokenizer": _M["tokenizer"]["tokenizer"],
            "tokenizer_config": _M["tokenizer_config"]["tokenizer"],
        }
    meta = f.meta
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{f.path} holds no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    groups = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_cfg = groups["tokenizer"], groups["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":
        tok_cfg.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    tokens = tok_dict["tokens"]
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_cfg[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, _ = convert_gguf_tokenizer(f.arch, tok_dict)
    except Exception as e:
        raise GGUFError(f"{f.path}: cannot build its tokenizer ({type(e).__name__}: {e})") from e
    _set_special_tokens_template(backend, tok_cfg, meta)
    backend.save(str(out / "tokenizer.json"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("add_bos_token", None), tok_cfg.pop("add_eos_token", None)  # now in tokenizer.json itself
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=1))


def _set_special_tokens_template(backend, tok_cfg: dict, meta: dict) -> None:
    """Makes tokenizer.json itself add BOS / EOS as the file's add_bos_token / add_eos_token say (transformers
    applies those flags to its tokenizer object; the app reads only tokenizer.json). Left alone when the file
    says nothing or the converted tokenizer already does what it says."""
    from tokenizers import processors

    flags = {k: tok_cfg.get(f"add_{k}_token") for k in ("bos", "eos")}
    if all(v is None for v in flags.values()):
        return
    specials = {k: (tok_cfg.get(f"{k}_token"), meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos")}
    want = {k: bool(flags[k]) and specials[k][1] is not None for k in ("bos", "eos")}
    probe_plain, probe = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    has = {
        "bos": probe[:1] == [specials["bos"][1]] and len(probe) > len(probe_plain),
        "eos": probe[-1:] == [specials["eos"][1]] and len(probe) > len(probe_plain),
    }
    if has == want:
        return
    pre = [specials["bos"][0]] if want["bos"] else []
    post = [specials["eos"][0]] if want["eos"] else []
    single = " ".join([*(f"{t}:0" for t in pre), "$A:0", *(f"{t}:0" for t in post)])
    pair = single + " " + " ".join([*(f"{t}:1" for t in pre), "$B:1", *(f"{t}:1" for t in post)])
    used = [(specials[k][0], specials[k][1]) for k in ("bos", "eos") if want[k]]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
