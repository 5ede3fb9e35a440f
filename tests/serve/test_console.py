"""What the launcher tells the operator: plain lines on a terminal, JSON events with the same facts as fields
in a JSON log (so a log stream stays one JSON object a line)."""

import io
import json
import sys

import pytest

from ringllm.serve import console


class _Stderr(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture(params=[True, False], ids=["terminal", "json"])
def stderr(request, monkeypatch):
    """A stderr that is a terminal or not, set in the test's own phase (pytest swaps sys.stderr between
    phases): the test calls it first."""
    stream = _Stderr(request.param)

    def install() -> _Stderr:
        monkeypatch.setattr(sys, "stderr", stream)
        console.configure("info")
        return stream

    return install


BANNER = "ringllm ready on http://127.0.0.1:8000 | model m | tp 2 pp 1 | KV capacity 4096 tokens"


def test_the_ready_line_is_a_line_on_a_terminal_and_an_event_with_its_facts_in_json(stderr):
    stderr = stderr()
    console.ready_line("http://127.0.0.1:8000", "m", 2, 1, 4096, 1)
    if stderr.terminal:
        assert stderr.getvalue() == BANNER + "\n"
        return
    (line,) = stderr.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == BANNER and event["level"] == "info"
    assert {k: event[k] for k in ("url", "model", "tp", "pp", "kv_capacity_tokens", "dp")} == dict(
        url="http://127.0.0.1:8000", model="m", tp=2, pp=1, kv_capacity_tokens=4096, dp=1
    )


def test_with_several_replicas_the_capacity_is_per_replica(stderr):
    stderr = stderr()
    console.ready_line("https://h:1", "m", 1, 1, 10, 2)
    assert "ringllm ready on https://h:1 | model m | tp 1 pp 1 | KV capacity 10 tokens per replica | dp 2" in (
        stderr.getvalue()
    )


def test_the_demo_note_and_the_unknown_variables(stderr):
    stderr = stderr()
    console.demo_note()
    console.warn_unknown_variables(["RINGLLM_X (did you mean RINGLLM_Y?)"])
    console.warn_unknown_variables([])  # nothing to say: no line
    lines = stderr.getvalue().splitlines()
    if stderr.terminal:
        assert lines[0] == console.DEMO_NOTE
        assert "RINGLLM_X (did you mean RINGLLM_Y?)" in lines[1] and len(lines) == 2
        return
    note, warning = (json.loads(line) for line in lines)
    assert note["event"] == console.DEMO_NOTE and note["weights"] == "random"
    assert warning["level"] == "warning" and warning["variables"] == ["RINGLLM_X (did you mean RINGLLM_Y?)"]
