"""Loading checkpoints: GGUF files (weights, config, tokenizer), incomplete or quantized checkpoints refused
at start, a missing tokenizer named before any weights load, and the tokenizer of a GGUF file as transformers
reads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from ringllm.engine.gguf import GGUFError, unpermute_qk
from ringllm.engine.loader import ModelNotFoundError
from tests.helpers import (
    hf_greedy,
    run_engine,
    tiny_checkpoint,
)

PROMPTS = [[5, 9, 200, 17], [1], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43]]
MAX_NEW = 8
_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of llama Q/K rows (the one ringllm must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_freq_factors(cfg: dict) -> np.ndarray:
    """What llama.cpp writes as rope_freqs.weight for a Llama 3 rope_scaling."""
    rs, dim = _rope(cfg), cfg["head_dim"]
    inv = 1.0 / (rs["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old, factor, low, high = (
        rs["original_max_position_embeddings"],
        rs["factor"],
        rs["low_freq_factor"],
        rs["high_freq_factor"],
    )
    out = []
    for freq in inv:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope(cfg: dict) -> dict:
    """transformers 5 writes rope_parameters (with rope_theta inside), older versions rope_scaling."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope


def to_gguf(hf_dir: Path, out: Path, qtype: str = "F32", arch: str | None = None, drop: str | None = None) -> Path:
    """A GGUF file of a Hugging Face checkpoint, written as llama.cpp's converter writes one."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = arch or cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(_rope(cfg)["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    state = {}
    for f in hf_dir.glob("*.safetensors"):
        state.update(load_file(f))
    if _rope(cfg).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_freq_factors(cfg))
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in sorted(state.items()):
        if name == drop:
            continue
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, *rest = name.split(".")
            gname = f"blk.{layer}.{_GGUF_BLOCK['.'.join(rest[:-1])]}.{rest[-1]}"
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = cfg["num_attention_heads"] if ".attn_q." in gname else cfg["num_key_value_heads"]
            a = _permute(a, heads)
        # Norms and biases stay F32, as llama.cpp writes them.
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _engine(model, **kw) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", kv_cache_tokens=512, **kw))


def _greedy(model, prompts=PROMPTS, **kw) -> list[list[int]]:
    engine = _engine(model, **kw)
    try:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        return run_engine(engine, prompts, params)
    finally:
        engine.close()


# ---- GGUF ----
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_a_gguf_file_computes_what_its_source_checkpoint_computes(family, tmp_path):
    """F32 GGUF: the same weights, so the same greedy tokens as transformers on the safetensors source. The
    llama file has its Q/K rows permuted (llama.cpp) and Llama 3 rope scaling stored as rope_freqs: both
    undone."""
    hf = tiny_checkpoint(family, tmp_path / "hf", tie=family == "qwen2")
    model = to_gguf(hf, tmp_path / f"{family}.gguf")
    assert _greedy(model) == hf_greedy(hf, PROMPTS, MAX_NEW)
    # A directory holding one .gguf file (and no config.json) is that file.
    (tmp_path / "dir").mkdir()
    shutil.copy(model, tmp_path / "dir" / "m.gguf")
    assert _engine(tmp_path / "dir").model_path.name == "m.gguf"


def test_q8_gguf_loads_dequantized_and_close_to_the_source(tmp_path):
    """A quantized file loads into the serving dtype; its weights are the source's within Q8_0's error."""
    import gguf

    hf = tiny_checkpoint("llama", tmp_path / "hf")
    model = to_gguf(hf, tmp_path / "q8.gguf", qtype="Q8_0")
    f32 = _engine(to_gguf(hf, tmp_path / "f32.gguf"))
    q8 = _engine(model)
    a = dict(f32.runner.model.named_parameters())
    for name, p in q8.runner.model.named_parameters():
        assert p.dtype == torch.float32
        scale = a[name].abs().max().item()
        assert (p - a[name]).abs().max().item() <= scale / 100, name  # Q8_0: 1/127 of a block's max
        if p.ndim == 2:
            assert not torch.equal(p, a[name]), f"{name} was not quantized in the test file"
    assert gguf.GGMLQuantizationType.Q8_0.name == "Q8_0"


@pytest.mark.parametrize("qtype", ["Q8_0", "F16", "F32"])
def test_dequantizing_in_row_chunks_into_one_buffer_gives_the_gguf_packages_arrays(qtype, tmp_path, monkeypatch):
    """GGUFFile.hf_tensors dequantizes a few rows at a time into one reused buffer (engine/gguf.py's _Buffer):
    with chunks of 3 rows (most tensors end on a partial chunk), every tensor equals the gguf package's own
    dequantization of the whole tensor, as float32, and the 2-D ones share the buffer."""
    from gguf.quants import dequantize

    from ringllm.engine import gguf as ringllm_gguf

    hf = tiny_checkpoint("qwen2", tmp_path / "hf")
    f = ringllm_gguf.GGUFFile(to_gguf(hf, tmp_path / f"{qtype}.gguf", qtype=qtype))
    cfg = f.config()
    row = {t.name: dequantize(t.data[:1], t.tensor_type).nbytes for t in f.reader.tensors if t.data.ndim == 2}
    monkeypatch.setattr(ringllm_gguf._Buffer, "CHUNK_BYTES", 3 * max(row.values()))
    bases = set()
    for (name, got), t in zip(f.hf_tensors(cfg), f.reader.tensors):
        assert name == ringllm_gguf.hf_name(t.name)
        want = dequantize(t.data, t.tensor_type)
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want), name
        if got.ndim == 2:
            bases.add(id(got.base))
    assert len(bases) == 1 and len(row) > 1


def test_llama_unpermute_inverts_llama_cpp():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_qk(_permute(w, 4), 4), w)
    assert not np.array_equal(_permute(w, 4), w)


def test_unknown_gguf_architecture_and_tensor_type_are_clear_errors(tmp_path):
    import gguf

    hf = tiny_checkpoint("qwen3", tmp_path / "hf")
    with pytest.raises(GGUFError, match="'phi3' is not supported; ringllm serves qwen2, qwen3, llama"):
        _engine(to_gguf(hf, tmp_path / "phi.gguf", arch="phi3"))
    # A tensor type the gguf package cannot dequantize: an I32 tensor in place of a norm.
    path = to_gguf(hf, tmp_path / "bad.gguf")
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "qwen3")
    for field in r.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        w.add_key_value(
            field.name, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None
        )
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == "output_norm.weight":
            data = data.astype(np.int32)
        shape = None if t.name == "output_norm.weight" else list(reversed(t.shape.tolist()))
        w.add_tensor(t.name, data, raw_shape=shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="output_norm.weight is stored as I32, which cannot be dequantized"):
        _engine(tmp_path / "i32.gguf")


# ---- incomplete and quantized checkpoints (issue 12, item 9) ----
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_missing_tensor_is_an_error_naming_it(fmt, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_checkpoint("qwen2", tmp_path / "hf")
    gone = "model.layers.1.mlp.down_proj.weight"
    if fmt == "gguf":
        model = to_gguf(hf, tmp_path / "m.gguf", drop=gone)
    else:
        file = next(hf.glob("*.safetensors"))
        state = load_file(file)
        del state[gone]
        save_file(state, file, metadata={"format": "pt"})
        model = hf
    with pytest.raises(ModelNotFoundError, match=f"incomplete: 1 tensor.*missing: {gone}$"):
        _engine(model)


def test_a_quantization_config_is_refused_at_start(tmp_path):
    hf = tiny_checkpoint("qwen3", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError, match="quantization_config \\(quant_method 'fp8'\\)"):
        _engine(hf)


# ---- a missing tokenizer is named before anything loads (issue 12, item 11) ----
def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ringllm", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=dict(os.environ, RINGLLM_NO_PROGRESS="1"),
    )


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_a_missing_tokenizer_fails_first_naming_the_file(command, tmp_path):
    hf = tiny_checkpoint("qwen3", tmp_path / "hf")  # weights and config, no tokenizer files
    assert not (hf / "tokenizer.json").exists()
    args = ["serve", "--port", "1"] if command == "serve" else ["generate", "hi"]
    args += ["--model", str(hf)]
    done = _cli(*args)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert f"no tokenizer: {hf / 'tokenizer.json'} does not exist" in out
    assert "weights loaded" not in out and "ready" not in out


def test_the_tokenizer_of_a_gguf_file_is_found_in_it(tmp_path, demo_path):
    """A .gguf without tokenizer metadata is named as such; the app's tokenizer accepts a .gguf path."""
    from ringllm.text.tokenizer import TokenizerError, tokenizer_directory

    hf = tiny_checkpoint("qwen3", tmp_path / "hf")
    model = to_gguf(hf, tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match="holds no tokenizer"):
        tokenizer_directory(model)
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenizer_directory(tmp_path / "nothing-here")
    assert tokenizer_directory(demo_path) == demo_path


def _with_tokenizer(model: Path, tokenizer_dir: Path, out: Path, add_bos: bool) -> Path:
    """`model` (a GGUF file) with the byte-level BPE tokenizer of `tokenizer_dir` in its metadata, as
    llama.cpp's converter writes a gpt2-type vocabulary."""
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj["added_tokens"]}
    vocab.update(special)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    r = gguf.GGUFReader(str(model))
    w = gguf.GGUFWriter(str(out), r.fields["general.architecture"].contents())
    for field in r.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(
                field.name, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None
            )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(cfg["chat_template"])
    for t in r.tensors:
        shape = list(reversed(t.shape.tolist()))
        w.add_tensor(t.name, np.array(t.data), raw_shape=shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_app_tokenizer_of_a_gguf_file_equals_transformers(add_bos, tmp_path, demo_path, monkeypatch):
    """The API worker's tokenizer built from a GGUF's metadata encodes, adds BOS (add_bos_token) and renders
    the chat template as transformers' from_pretrained(dir, gguf_file=...) does; the engine loads the file."""
    from transformers import AutoTokenizer

    from ringllm.text.tokenizer import Tokenizer, transformers_tokenizer

    monkeypatch.setenv("RINGLLM_CACHE", str(tmp_path / "cache"))
    hf = tiny_checkpoint("qwen3", tmp_path / "hf", vocab=1024)
    model = _with_tokenizer(to_gguf(hf, tmp_path / "bare.gguf"), demo_path, tmp_path / "m.gguf", add_bos)
    want = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=model.name)
    app, offline = Tokenizer(model), transformers_tokenizer(model)
    text = "The sea is calm tonight<|im_end|> naïve 你好"
    bos = want.convert_tokens_to_ids("<|endoftext|>")
    assert want(text).input_ids[:1] == ([bos] if add_bos else want(text).input_ids[:1])
    for special in (False, True):
        ids = want(text, add_special_tokens=special).input_ids
        assert app.encode(text, add_special_tokens=special) == ids
        assert offline(text, add_special_tokens=special).input_ids == ids
    assert (want(text).input_ids[0] == bos) == add_bos
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi <|im_start|>"}]
    ids = want.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert app.encode_chat(app.apply_chat_template(messages)) == ids
    assert _greedy(model)[0]  # and it serves
