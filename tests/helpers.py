"""Tiny random-weight Hugging Face checkpoints and a loop that runs an Engine to completion."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

FAMILIES = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64), rope_theta=500000.0),
}


def tiny_checkpoint(family: str, out: Path, vocab: int = 256, tie: bool = False, seed: int = 0,
                    head_dim: int = 16, dtype: torch.dtype = torch.float32) -> Path:
    """Saves a random-weight model of `family` with transformers' own classes, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                               max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=tie,
                               rms_norm_eps=1e-6, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide mistakes in how they are applied
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    return out


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def run_engine(engine, prompts: list[list[int]], params, rid_prefix: str = "r") -> list[list[int]]:
    """Adds every prompt, steps until all finish, returns the generated ids in prompt order."""
    rids = [f"{rid_prefix}{i}" for i in range(len(prompts))]
    out = {rid: [] for rid in rids}
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    steps = 0
    while engine.has_work:
        for o in engine.step():
            if o.token_id is not None:
                out[o.rid].append(o.token_id)
        steps += 1
        assert steps < 10_000, "engine did not finish"
    return [out[r] for r in rids]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


# ---- `ringllm serve` on loopback ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache_dir, *args, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `ringllm serve` on the demo model on a free loopback port; returns once /health answers 200."""
    port = free_port()
    env = dict(os.environ, RINGLLM_CACHE=str(cache_dir), **(env or {}))
    log = open(os.path.join(cache_dir, "serve.log"), "wb")  # a file, not a pipe: a full pipe would stall it
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port), "--device", "cpu", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, open(log.name, "rb").read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def metric(server, name, headers=None):
    text = httpx.get(server + "/metrics", timeout=5, headers=headers).text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):  # with labels (model_name), the first series
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_metric(server, name, value, seconds=10.0, headers=None) -> float:
    """Polls /metrics until `name` reads `value` or `seconds` pass; returns the last reading."""
    deadline = time.monotonic() + seconds
    while (got := metric(server, name, headers)) != value and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out
