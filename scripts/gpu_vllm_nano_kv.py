"""vLLM's nano run (the offline bundle's .vllm-run/nano_offline.py, unchanged) with a chosen KV-cache dtype, for
the fp8-against-fp8 comparison of scripts/bench.py --kv-cache-dtype fp8:

    source .vllm-run/env.sh && python3 scripts/gpu_vllm_nano_kv.py --kv-cache-dtype fp8 --model /tmp/qwen3-0.6b

Every argument but --kv-cache-dtype goes to nano_offline.py. vllm.LLM is wrapped so that the bundle's make_llm()
builds its engine with kv_cache_dtype set; nothing else about the run changes. Needs the team's vLLM bundle in
.vllm-run/ (not part of this repository)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / ".vllm-run"
sys.path.insert(0, str(RUN))
import vllm_env  # noqa: E402, F401  (the offline environment, before vllm loads)


def main() -> None:
    args = sys.argv[1:]
    kv_dtype = "auto"
    if "--kv-cache-dtype" in args:
        i = args.index("--kv-cache-dtype")
        kv_dtype = args[i + 1]
        del args[i : i + 2]
    import vllm

    base = vllm.LLM

    class LLM(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kw):
            super().__init__(kv_cache_dtype=kv_dtype, **kw)

    vllm.LLM = LLM
    sys.argv = [str(RUN / "nano_offline.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
