"""Stop strings, matched on the text as it streams: the first one found ends the text (it is not emitted), and
a tail that could still become the start of one is held back until it cannot. Text fed as `exempt` (the output
of the first min_tokens tokens) cannot hold a stop string that ends within it, but may begin one, as in vLLM.

Each stop string is followed by a Knuth-Morris-Pratt automaton whose state is the longest tail of the text so far
that begins the stop string: each new character moves it in amortized constant time, so the work is linear in the
output and never rescans the held tail. (Trying every prefix of every stop string against the tail, as this did
before, cost each token the square of the stop's length: long stop strings made the API worker's CPU the limit,
issue 28.) The failure table is built only as far as the state has reached, so a long stop string that the text
never begins costs nothing up front."""

from __future__ import annotations


class _Automaton:
    """One stop string's matcher: `state` characters of it end the text fed so far."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0
        self.table = [0]  # KMP's failure function: table[k] = the longest proper border of stop[: k + 1]

    def step(self, char: str) -> bool:
        """Feeds one character; true when the whole stop string now ends the text (the state then continues from
        its longest border, so that an exempt match does not hide one that overlaps it)."""
        stop, q = self.stop, self.state
        while q and stop[q] != char:
            q = self.table[q - 1]
        if stop[q] == char:
            q += 1
        if q == len(stop):
            self._grow(q)
            self.state = self.table[q - 1]
            return True
        self._grow(q)
        self.state = q
        return False

    def _grow(self, length: int) -> None:
        """Extends the failure table to cover stop[:length] (one entry per character the state ever reached)."""
        stop, table = self.stop, self.table
        while len(table) < length:
            k, j = len(table), table[-1]
            while j and stop[k] != stop[j]:
                j = table[j - 1]
            table.append(j + 1 if stop[k] == stop[j] else 0)


class StopStringMatcher:
    """Feeds text through; finds the first stop string (which is not emitted) and holds back any tail that is
    still a prefix of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._automata = [_Automaton(s) for s in self.stops]
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
        start = self._first_match(text, len(self.pending), exempt_chars)
        if start is not None:
            self.stopped = True
            self.pending = ""
            return buf[:start]
        hold = max(a.state for a in self._automata)  # the longest tail that may still become a stop string
        self.pending = buf[len(buf) - hold :] if hold else ""
        self.exempt = max(0, exempt_chars - (len(buf) - hold))
        return buf[: len(buf) - hold]

    def _first_match(self, text: str, offset: int, exempt_chars: int) -> int | None:
        """Where in the buffer (`offset` held characters, then `text`) the earliest-starting stop string begins,
        of those that end past the exempt characters; None if none does."""
        first = None
        for automaton in self._automata:
            for i, char in enumerate(text):
                end = offset + i  # the buffer index of this character
                if automaton.step(char) and end >= exempt_chars:
                    start = end - len(automaton.stop) + 1
                    first = start if first is None else min(first, start)
                    break
        return first

    def flush(self) -> str:
        """The held tail: the text ended without it becoming a stop string."""
        out, self.pending = self.pending, ""
        for automaton in self._automata:
            automaton.state = 0  # nothing is held back any more
        return out
