"""Load generator for any OpenAI-compatible server (this one or another), over HTTP with streaming.

    python scripts/bench_client.py --base-url http://127.0.0.1:8000/v1 --workload nano --concurrency 256
    python scripts/bench_client.py --workload random --input-len 100:1024 --output-len 100:1024 --rate 20
    python scripts/bench_client.py --workload shared-prefix --num-requests 256
    python scripts/bench_client.py --workload jsonl --file prompts.jsonl   # {"prompt": ..., "max_tokens": ...}

Closed loop (--concurrency N requests in flight) or open loop (--rate requests per second, Poisson). Prints a
table (request throughput, output tok/s, TTFT / TPOT / ITL p50/p90/p99, errors) and writes --json."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def build_workload(a) -> list[dict]:
    rng = random.Random(a.seed)
    if a.workload == "nano":  # nano-vllm's bench: token-id prompts, ignore_eos, temperature 0.6
        random.seed(0)
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        return [dict(prompt=p, max_tokens=random.randint(100, 1024), temperature=0.6, ignore_eos=True) for p in prompts]
    if a.workload == "random":
        (ilo, ihi), (olo, ohi) = _range(a.input_len), _range(a.output_len)
        return [dict(prompt=[rng.randint(0, a.vocab - 1) for _ in range(rng.randint(ilo, ihi))],
                     max_tokens=rng.randint(olo, ohi), temperature=a.temperature, ignore_eos=True)
                for _ in range(a.num_requests)]
    if a.workload == "shared-prefix":
        systems = [[rng.randint(0, a.vocab - 1) for _ in range(a.prefix_len)] for _ in range(a.num_prefixes)]
        return [dict(prompt=systems[i % a.num_prefixes] + [rng.randint(0, a.vocab - 1) for _ in range(a.suffix_len)],
                     max_tokens=_range(a.output_len)[1], temperature=a.temperature, ignore_eos=True)
                for i in range(a.num_requests)]
    rows = [json.loads(line) for line in Path(a.file).read_text().splitlines() if line.strip()]
    return [dict(prompt=r["prompt"], max_tokens=r.get("max_tokens", 128), temperature=a.temperature) for r in rows]


async def one(client: httpx.AsyncClient, url: str, model: str | None, req: dict, headers: dict) -> Result:
    body = dict(req, stream=True, stream_options={"include_usage": True})
    if model:
        body["model"] = model
    res, start, last = Result(), time.perf_counter(), None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                # Every chunk with a choice carries tokens, even when their text is empty (an incomplete
                # character, or ids the tokenizer does not know): time them all.
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(a) -> dict:
    work = build_workload(a)
    url = a.base_url.rstrip("/") + "/completions"
    headers = {"authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=max(a.concurrency, 64), max_keepalive_connections=max(a.concurrency, 64))
    results: list[Result] = []
    bar = tqdm(total=len(work), desc="requests", disable=a.no_progress)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits) as client:
        start = time.perf_counter()
        if a.rate:
            rng, tasks = random.Random(a.seed), []
            for req in work:
                tasks.append(asyncio.create_task(one(client, url, a.model, req, headers)))
                tasks[-1].add_done_callback(lambda _t: bar.update())
                await asyncio.sleep(rng.expovariate(a.rate))
            results = await asyncio.gather(*tasks)
        else:
            queue = list(reversed(work))

            async def worker():
                while queue:
                    results.append(await one(client, url, a.model, queue.pop(), headers))
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(min(a.concurrency, len(work)))))
        elapsed = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    summary = {"workload": a.workload, "requests": len(results), "errors": len(results) - len(ok),
               "seconds": elapsed, "request_throughput": len(ok) / elapsed, "output_tok_per_s": out_tokens / elapsed,
               "output_tokens": out_tokens}
    for name, vals in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl)):
        for q in (0.5, 0.9, 0.99):
            summary[f"{name}_p{int(q * 100)}_ms"] = pct(vals, q) * 1e3
    summary["first_errors"] = [r.error for r in results if not r.ok][:5]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--workload", default="random", choices=["random", "nano", "shared-prefix", "jsonl"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", default="100:1024")
    ap.add_argument("--output-len", default="100:1024")
    ap.add_argument("--vocab", type=int, default=10000, help="token ids are drawn below this")
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--num-prefixes", type=int, default=8)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--file", default=None)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (0: closed loop)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    if a.workload == "jsonl" and not a.file:
        sys.exit("--workload jsonl needs --file")
    s = asyncio.run(run(a))
    print(f"\n{'requests':>9} {'errors':>6} {'seconds':>8} {'req/s':>7} {'out tok/s':>10} | "
          f"{'TTFT p50/p90/p99 ms':>22} | {'TPOT p50/p90/p99 ms':>22} | {'ITL p50/p90/p99 ms':>22}")
    trip = lambda n: "/".join(f"{s[f'{n}_p{q}_ms']:.1f}" for q in (50, 90, 99))  # noqa: E731
    print(f"{s['requests']:>9} {s['errors']:>6} {s['seconds']:>8.2f} {s['request_throughput']:>7.2f} "
          f"{s['output_tok_per_s']:>10.0f} | {trip('ttft'):>22} | {trip('tpot'):>22} | {trip('itl'):>22}")
    if s["first_errors"]:
        print("errors:", *s["first_errors"], sep="\n  ")
    if a.json:
        a.json.write_text(json.dumps(s, indent=2))


if __name__ == "__main__":
    main()
