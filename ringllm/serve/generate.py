"""`ringllm generate`: the engine in this process (imported here, when the command runs, so that the rest of
the command line never loads torch), one prompt streamed to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ringllm.engine.config import EngineConfig
from ringllm.serve.console import demo_note
from ringllm.serve.options import from_args


def cmd_generate(args: argparse.Namespace) -> int:
    from ringllm.engine.llm import LLM
    from ringllm.engine.sampling_params import SamplingParams
    from ringllm.text.chat_template import chat_prompt_ids

    if args.model is None:
        demo_note()
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sampling_seed,
            stop=args.stop,
        )
        llm = LLM(config=from_args(EngineConfig, args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def stream(prompt: str | list[int]) -> str | None:
        reason = None
        async for piece in llm.generate(prompt, params):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            reason = piece.finish_reason
        return reason

    try:
        # --chat: rendered and tokenized as the server's chat route does it (a model without a template: exit 2)
        chat = [{"role": "user", "content": args.prompt}]
        reason = asyncio.run(stream(chat_prompt_ids(llm.tokenizer, chat) if args.chat else args.prompt))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.close()
    print(f"\n[finish_reason: {reason}]", file=sys.stderr)
    return 0
