"""Where compiled kernels are kept (engine/runner/kernel_cache.py): Triton's cache and FlashInfer's JIT
workspace under ringllm's cache directory, set only where the user has not set them, and the account of what a
run added to them."""

import os
import subprocess
import sys

from ringllm.engine.cache_dir import cache_root
from ringllm.engine.runner.kernel_cache import cached_kernels, kernel_names, use_kernel_caches


def test_the_caches_go_under_the_ringllm_cache(tmp_path):
    env = {"RINGLLM_CACHE": str(tmp_path / "c")}
    chosen = use_kernel_caches(env)
    assert chosen == {
        "TRITON_CACHE_DIR": str(tmp_path / "c" / "triton"),
        "FLASHINFER_WORKSPACE_BASE": str(tmp_path / "c" / "flashinfer"),
    }
    assert env == {"RINGLLM_CACHE": str(tmp_path / "c"), **chosen}
    assert all(os.path.isdir(p) for p in chosen.values())
    assert use_kernel_caches(env) == {}  # a second call changes nothing


def test_a_users_own_setting_is_kept(tmp_path):
    env = {"RINGLLM_CACHE": str(tmp_path), "TRITON_CACHE_DIR": "/mine/triton"}
    assert use_kernel_caches(env) == {"FLASHINFER_WORKSPACE_BASE": str(tmp_path / "flashinfer")}
    assert env["TRITON_CACHE_DIR"] == "/mine/triton"
    env = {"RINGLLM_CACHE": str(tmp_path), "TRITON_CACHE_DIR": "/a", "FLASHINFER_WORKSPACE_BASE": "/b"}
    assert use_kernel_caches(env) == {} and env["FLASHINFER_WORKSPACE_BASE"] == "/b"


def test_the_default_root_is_the_home_cache(tmp_path):
    assert cache_root({}) == cache_root({"RINGLLM_CACHE": ""})
    assert str(cache_root({})).endswith(os.path.join(".cache", "ringllm"))


def test_an_unwritable_root_leaves_the_library_defaults(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {"RINGLLM_CACHE": str(blocker)}
    assert use_kernel_caches(env) == {}
    assert "TRITON_CACHE_DIR" not in env and "FLASHINFER_WORKSPACE_BASE" not in env


def test_what_a_run_compiled_is_what_appeared(tmp_path):
    env = {"RINGLLM_CACHE": str(tmp_path)}
    use_kernel_caches(env)
    triton, flashinfer = tmp_path / "triton", tmp_path / "flashinfer"
    (triton / "h1").mkdir()
    (triton / "h1" / "_rmsnorm_kernel.cubin").write_bytes(b"")
    (triton / "h1" / "_rmsnorm_kernel.json").write_text("{}")
    before = cached_kernels(env)
    assert before == {"TRITON_CACHE_DIR/h1/_rmsnorm_kernel.cubin"}
    ops = flashinfer / ".cache" / "flashinfer" / "90a" / "cached_ops" / "batch_prefill_bf16"
    ops.mkdir(parents=True)
    (ops / "batch_prefill_bf16.so").write_bytes(b"")
    (triton / "h2").mkdir()
    (triton / "h2" / "_silu_mul_kernel.cubin").write_bytes(b"")
    assert kernel_names(cached_kernels(env) - before) == ["_silu_mul_kernel", "batch_prefill_bf16"]


def test_importing_it_loads_neither_library():
    code = (
        "import sys; import ringllm.engine.runner.kernel_cache; "
        "print(any(m.split('.')[0] in ('triton', 'flashinfer') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
