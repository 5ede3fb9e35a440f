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
