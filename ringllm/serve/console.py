"""What `ringllm serve` and `ringllm generate` tell the operator besides the request logs: the demo-model note,
the ready line, unknown RINGLLM_ variables.

Logs are JSON when stderr is not a terminal (a file, a pipe, a container's log) and readable text on one; the
decision is made here, once, for the launcher's own logging and Granian's. In a JSON log the note and the ready
line are JSON events too, their facts as fields, so the stream stays one JSON object a line; on a terminal they
are plain lines."""

from __future__ import annotations

import sys

from ringllm.engine.logs import configure_logging, get_logger, stdlib_logging_config

log = get_logger("serve")

DEMO_NOTE = (
    "note: no --model given, so this is ringllm's demo model: random weights, so its output is random "
    "text. Point --model at a Hugging Face checkpoint directory (or hub id) for real output."
)


def json_logs() -> bool:
    return not sys.stderr.isatty()


def configure(level: str) -> None:
    configure_logging(level, json=json_logs())


def granian_logging(level: str) -> dict:
    """Granian's logging config: its records through the same structlog chain, JSON or not as ours."""
    return stdlib_logging_config(level, json=json_logs())


def say(text: str, **facts) -> None:
    """A line for the operator: itself on a terminal, a JSON event (`event` is the line) with `facts` as
    fields in a JSON log."""
    if json_logs():
        log.info(text, **facts)
    else:
        line(text)


def line(text: str) -> None:
    """A plain line on stderr in one write: the engines share this stderr, unbuffered, and print's separate
    newline would let their log lines in between (engine/logs.py writes its lines so too)."""
    sys.stderr.write(text + "\n")


def demo_note() -> None:
    say(DEMO_NOTE, model="demo", weights="random")


def ready_line(url: str, model: str, tp: int, pp: int, kv_tokens: int, dp: int) -> None:
    text = f"ringllm ready on {url} | model {model} | tp {tp} pp {pp} | KV capacity {kv_tokens} tokens"
    if dp > 1:
        text += f" per replica | dp {dp}"
    say(text, url=url, model=model, tp=tp, pp=pp, kv_capacity_tokens=kv_tokens, dp=dp)


def warn_unknown_variables(names: list[str]) -> None:
    """RINGLLM_ variables nothing reads: most likely a misspelt option, which would otherwise be ignored."""
    if names:
        log.warning("ignored: no option or setting has these RINGLLM_ variables", variables=names)
