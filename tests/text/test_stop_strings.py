"""Stop strings on streamed text: the first one ends the text and is not emitted, and a tail that could still
start one is held back until it cannot."""

from ringllm.text.stop_strings import StopStringMatcher


def test_stop_matcher_across_pieces():
    m = StopStringMatcher(["STOP", "xyz"])
    emitted = m.feed("hello ST")
    assert emitted == "hello " and not m.stopped  # "ST" may start a stop string: held back
    emitted += m.feed("OPPED")
    assert m.stopped and emitted == "hello "
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == "" and m.feed("ep") == "STep" and not m.stopped


def test_the_stop_string_that_starts_first_wins_and_a_held_tail_is_flushed():
    m = StopStringMatcher(["bc", "abcd"])
    assert m.feed("xab") == "x" and m.feed("cd") == "" and m.stopped  # "abcd" starts before "bc"
    m = StopStringMatcher(["end"])
    assert m.feed("the en") == "the " and m.flush() == "en" and not m.stopped


def test_no_stop_strings_pass_everything():
    m = StopStringMatcher(["", ""])
    assert m.feed("anything") == "anything" and not m.stopped


def test_exempt_text_holds_no_stop_string_but_may_begin_one():
    """vLLM's min_tokens: a stop string that ends within the exempt text does not count; one that begins there
    and ends in later text does."""
    m = StopStringMatcher(["STOP"])
    assert m.feed("a STOP b ST", exempt=True) == "a STOP b " and not m.stopped
    assert m.feed("OP c") == "" and m.stopped  # began in the exempt text, ended after it
    m = StopStringMatcher(["STOP", "x"])
    assert m.feed("STO", exempt=True) == "" and m.feed("x") == "STO" and m.stopped  # "x" ends after it
    m = StopStringMatcher(["ab", "b"])
    assert m.feed("a", exempt=True) == "" and m.feed("") == "" and not m.stopped
    assert m.feed("b") == "" and m.stopped
    m = StopStringMatcher(["bcd"])
    assert m.feed("abc", exempt=True) == "a" and m.feed("e") == "bce" and not m.stopped


def _reference(stops: list[str], pieces: list[tuple[str, bool]]) -> tuple[list[str], bool]:
    """What the matcher must emit, by brute force: every stop string searched in the whole buffer and every
    prefix of it tried against the tail (the quadratic way this module worked before issue 28)."""
    stops = [s for s in stops if s]
    pending, exempt_left, out = "", 0, []
    for text, exempt in pieces:
        buf = pending + text
        exempt_chars = len(buf) if exempt else exempt_left
        hits = [i for s in stops if (i := buf.find(s, max(0, exempt_chars - len(s) + 1))) >= 0]
        if hits:
            return [*out, buf[: min(hits)]], True
        hold = max((n for s in stops for n in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:n])), default=0)
        pending, exempt_left = buf[len(buf) - hold :], max(0, exempt_chars - (len(buf) - hold))
        out.append(buf[: len(buf) - hold])
    return out, False


def test_the_matcher_agrees_with_brute_force_on_random_streams():
    """Small alphabets make overlapping, self-similar stop strings (aab in aaab, abab in ababab): the automaton's
    failure links are exercised, across pieces, with exempt text first."""
    import random

    rng = random.Random(28)
    for _ in range(3000):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        exempt = rng.randint(0, len(pieces))
        fed = [(p, i < exempt) for i, p in enumerate(pieces)]
        m = StopStringMatcher(stops)
        got = []
        for piece, ex in fed:
            got.append(m.feed(piece, exempt=ex))
            if m.stopped:
                break
        assert (got, m.stopped) == _reference(stops, fed), (stops, fed)


class _Counted(str):
    """A stop string that counts the characters the matcher reads out of it (by index or slice)."""

    read = 0

    def __getitem__(self, key):
        got = super().__getitem__(key)
        _Counted.read += len(got)
        return got


def test_a_long_stop_string_costs_each_character_of_output_a_bounded_read():
    """Issue 28: a stop string of length L cost every token L²/2 characters (each prefix sliced and compared to
    the tail). Here L = 2,000 and the output is 1,000 one-character tokens that keep the whole tail a prefix of
    the stop: the characters read out of the stop string stay a small multiple of the output (it was 1.7 × 10⁸)."""
    _Counted.read = 0
    stop = _Counted("a" * 1999 + "b")
    m = StopStringMatcher([stop])
    emitted = "".join(m.feed("a") for _ in range(1000))
    assert emitted == "" and len(m.pending) == 1000 and not m.stopped  # all held: it may still become the stop
    assert 0 < _Counted.read <= 8 * 1000, _Counted.read
    assert m.feed("b") == "a" * 1000 + "b" and m.flush() == "" and not m.stopped  # it did not
    assert 0 < _Counted.read <= 8 * 1001 + 4 * 1000, _Counted.read  # the fall back to the start costs the held tail
