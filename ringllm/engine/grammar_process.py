"""Grammar compiles in child processes, where one can be abandoned: xgrammar cannot stop a compile (a 355-byte
schema with the pattern ^(a|b|c){14000}$ converts for about a minute), and a Python thread cannot be
interrupted. A compile that runs past COMPILE_SECONDS, or whose requests all left, kills its process; the next
compile starts a fresh one. The child sends the compiled grammar back serialized (xgrammar's JSON), and its
peak compile memory dies with it. Each compile thread of engine/grammar.py owns one CompileProcess."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

COMPILE_SECONDS = 10.0  # one compile's time, from when the child starts it
START_SECONDS = 120.0  # a child's start (imports xgrammar and torch; slow on a loaded machine)
POLL_SECONDS = 0.02  # how often a waiting compile looks for its deadline or its abandonment
MAX_JSON_WHITESPACE = 16  # whitespace characters between two JSON elements ("\n" and 15 spaces of indent)

# Two defects of xgrammar 0.2.9's JSON strings, patched in the EBNF it writes: a string with minLength/maxLength
# takes [^"\\\r\n], which lets raw control characters (U+0000-U+001F) in, and every string class lets UTF-8
# encoded surrogates (ED A0 80 ...) in. Neither is JSON: Python's json.loads and JSON.parse refuse the first,
# and the second is not even UTF-8. Both classes become JSON's own, less the surrogates.
_STRING_CLASSES = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"


class GrammarError(ValueError):
    """The constraint did not compile, or not in time; the message names the field and says why."""


class CompileAbandoned(RuntimeError):
    """Every request waiting for the compile left; it was stopped."""


def message(e: Exception) -> str:
    """xgrammar's error without its C++ location prefix ("[12:00:00] /project/cpp/x.cc:42: ...")."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0]) if str(e) else type(e).__name__


def _json_grammar(schema: str, options: dict) -> str:
    """The EBNF of a JSON schema, with JSON's own string characters everywhere."""
    import xgrammar

    text = str(xgrammar.Grammar.from_json_schema(schema, **options))
    for loose in _STRING_CLASSES:
        text = text.replace(loose, _JSON_STRING_CHARS)
    return text


def compile_key(compiler, key: tuple[str, str, bool]):
    """The xgrammar CompiledGrammar of a constraint's key (kind, text, no_whitespace)."""
    kind, text, no_whitespace = key
    # JSON: whitespace between elements is free (pretty-printed output) but bounded per gap, so that a model
    # cannot wander in whitespace forever and a bounded schema bounds the output.
    space = {"any_whitespace": not no_whitespace, "max_whitespace_cnt": None if no_whitespace else MAX_JSON_WHITESPACE}
    if kind == "json":
        return compiler.compile_grammar(_json_grammar(text, space))
    if kind == "json_object":  # any object: strict mode would forbid every property of {"type": "object"}
        return compiler.compile_grammar(_json_grammar('{"type": "object"}', dict(space, strict_mode=False)))
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "choice":  # EBNF string literals take JSON's escapes
        choices = json.loads(text)
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return compiler.compile_grammar(text)


def _child(fd: int) -> None:
    """The compile process (`python -m ringllm.engine.grammar_process FD`): reads the tokenizer info, then
    answers each key with ("ok", serialized grammar) or ("error", message)."""
    from ringllm.ipc.process import die_with_parent

    die_with_parent(signal.SIGKILL, name="ringllm-grammar")
    conn = Connection(fd)
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(conn.recv())
    # Our cache (engine/grammar.py) holds the compiled grammars; xgrammar's own would keep every one.
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", ""))
    while True:
        try:
            key = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", compile_key(compiler, key).serialize_json()))
        except Exception as e:
            conn.send(("error", f"structured_outputs.{key[0]}: {message(e)}"))


class CompileProcess:
    """One child that compiles one grammar at a time; started on first use, killed when a compile overruns."""

    def __init__(self, tokenizer_info: str, timeout: float = COMPILE_SECONDS):
        self.tokenizer_info, self.timeout = tokenizer_info, timeout
        self._proc: Any = None  # the child's Popen
        self._conn: Any = None  # its end of the Pipe

    def compile(self, key: tuple[str, str, bool], abandoned: Callable[[], bool]) -> str:
        """The serialized compiled grammar of `key`; GrammarError if it does not compile or overruns,
        CompileAbandoned once `abandoned()` says nobody waits for it."""
        self._start(abandoned)
        assert self._conn is not None
        self._conn.send(key)
        status, payload = self._wait(time.monotonic() + self.timeout, abandoned, key[0])
        if status == "error":
            raise GrammarError(payload)
        return payload

    def _start(self, abandoned: Callable[[], bool]) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        # A fresh interpreter: the engine has threads (and maybe CUDA), so never fork it; and not multiprocessing's
        # spawn, which re-runs the parent's __main__ (an offline user's script) in the child.
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "ringllm.engine.grammar_process", str(theirs.fileno())]
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(self.tokenizer_info)
        self._wait(time.monotonic() + START_SECONDS, abandoned, "")

    def _wait(self, deadline: float, abandoned: Callable[[], bool], kind: str) -> tuple[str, str]:
        assert self._conn is not None
        while not self._conn.poll(POLL_SECONDS):
            if abandoned():
                self.close()
                raise CompileAbandoned("every request waiting for this grammar left")
            if time.monotonic() > deadline or self._proc is None or self._proc.poll() is not None:
                self.close()
                if kind:
                    raise GrammarError(
                        f"structured_outputs.{kind}: did not compile within {self.timeout:g} s; simplify it"
                    )
                raise RuntimeError("the grammar compile process did not start")
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # it died as it answered
            self.close()
            raise GrammarError(f"structured_outputs.{kind}: the grammar compiler failed") from None

    def close(self) -> None:
        """Kills the child (a compile it runs is lost)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


if __name__ == "__main__":
    _child(int(sys.argv[1]))
