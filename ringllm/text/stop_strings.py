"""Stop strings, matched on the text as it streams: the first one found ends the text (it is not emitted), and
a tail that could still become the start of one is held back until it cannot. Text fed as `exempt` (the output
of the first min_tokens tokens) cannot hold a stop string that ends within it, but may begin one, as in vLLM."""

from __future__ import annotations


class StopStringMatcher:
    """Feeds text through; finds the first stop string (which is not emitted) and holds back any tail that is
    still a prefix of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.exempt = 0  # leading characters of `pending` that were fed exempt
        self.stopped = False

    def feed(self, text: str, exempt: bool = False) -> str:
        """The text that is safe to emit now; sets `stopped` when a stop string is found that ends past the
        exempt text."""
        if not self.stops:
            return text
        buf = self.pending + text
        exempt_chars = len(buf) if exempt else self.exempt
        # a match must end past the exempt characters: search from where such a match could start
        hits = [(buf.find(s, max(0, exempt_chars - len(s) + 1)), s) for s in self.stops]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return buf[: min(hits)[0]]
        hold = max(
            (n for s in self.stops for n in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:n])), default=0
        )
        self.pending = buf[len(buf) - hold :] if hold else ""
        self.exempt = max(0, exempt_chars - (len(buf) - hold))
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
