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
