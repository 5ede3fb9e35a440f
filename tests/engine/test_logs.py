"""ringllm/engine/logs.py: every process's log lines, as they reach the one stderr the server's processes share."""

from __future__ import annotations

import json
import subprocess
import sys

WRITER = """
import sys
from ringllm.engine.logs import configure_logging, get_logger
configure_logging(json=True)
log = get_logger("t")
for i in range(int(sys.argv[1])):
    log.info("line", writer=sys.argv[2], i=i)
"""


def test_processes_sharing_stderr_never_split_each_others_lines(tmp_path):
    """A server's launcher, engine and API workers write JSON lines to one unbuffered stderr: a line and its
    newline must be one write, or another process's line lands between them (two records on one line, which a
    log shipper cannot parse; seen under load as `{...}{...}`)."""
    path, lines = tmp_path / "shared.log", 3000
    with open(path, "ab") as shared:  # O_APPEND, as a file a supervisor gives the server
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(lines), name], stderr=shared)
            for name in ("a", "b", "c")
        ]
        for w in writers:
            assert w.wait(timeout=300) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]  # each line one whole record
    assert sorted((r["writer"], r["i"]) for r in records) == sorted((w, i) for w in "abc" for i in range(lines))
