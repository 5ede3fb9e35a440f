"""One structlog set-up for every process: JSON when not on a terminal, pretty on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        # WriteLogger writes a line and its newline in one write (PrintLogger's print writes them in two); the
        # server's processes share one stderr, unbuffered, so two writes let another process's line in between.
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )


def stdlib_logging_config(level: str = "info", json: bool | None = None) -> dict:
    """A logging.config.dictConfig for libraries that log through the standard library (Granian's `_granian`
    logger, which its Rust side also writes to): their records are rendered by the same structlog chain
    as ours, one JSON object a line, with the logger's name."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        "foreign_pre_chain": [
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    }
    handler = {"class": "logging.StreamHandler", "formatter": "structlog", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["structlog"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structlog": formatter},
        "handlers": {"structlog": handler},
        "loggers": {"_granian": dict(logger), "granian.access": dict(logger)},
    }


def get_logger(name: str):
    return structlog.get_logger(name)


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of the write (it may be replaced after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def no_multiprocessing_locks() -> None:
    """tqdm (the weight-loading progress bar) makes a multiprocessing RLock, a named semaphore that a kill -9 of
    the process group leaves in /dev/shm; a thread lock serves one process as well. For the engine's and the
    GPU workers' processes."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
