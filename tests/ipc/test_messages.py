"""The ring's messages (ipc/messages.py) round-trip through their encoding."""

import msgspec
import pytest

from ringllm.ipc import messages as m


def test_messages_round_trip():
    gen = m.Generate("r1", m.pack_ids([1, 2, 70000]), m.Sampling(max_tokens=5, seed=3, stop_token_ids=[9]))
    back = m.decode_to_engine(m.encode(gen))
    assert back == gen and m.unpack_ids(back.token_ids) == [1, 2, 70000]
    out = m.StepOutput([m.TokenDelta("r1", m.pack_ids([5]), "stop", None, 3, 0)])
    assert m.decode_to_app(m.encode(out)) == out
    with pytest.raises(msgspec.ValidationError):
        m.decode_to_engine(m.encode(out))
