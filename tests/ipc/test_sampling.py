"""The request contract (ipc/sampling.py): every sampling field is declared once, with its bounds, and flows
from the OpenAI body through the ring to the engine's sampler (or to what handles it instead); the server
answers 400 for what it does not do."""

import json
import math

import msgspec
import numpy as np
import pytest

from ringllm.app.schemas import ChatRequest, CompletionRequest
from ringllm.engine.sampler import NOT_SAMPLED, ROW_FIELDS, RowTable
from ringllm.engine.sampler.rows import KERNEL, RUNNER
from ringllm.ipc import messages as m
from ringllm.ipc.sampling import SamplingFields, SamplingParams, StructuredOutputs

# A value other than the default for every shared field: a field added to SamplingFields without a value
# here fails the first test, so it is never forgotten on the way from the body to the engine.
CHANGED = {
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "min_p": 0.1,
    "seed": 7,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "ignore_eos": True,
    "min_tokens": 2,
    "stop_token_ids": [3, 4],
    "logit_bias": {"9": -100},
    "structured_outputs": {"regex": "[ab]+"},
    "allowed_token_ids": [5, 6],
    "bad_words": ["sea"],
    "prompt_logprobs": 1,
    "priority": -3,
    "truncate_prompt_tokens": 3,
    "truncation_side": "right",
}


# min_tokens and structured_outputs cannot be combined (the grammar decides where the output ends): the
# fields go in two bodies.
BODIES = [{k: v for k, v in CHANGED.items() if k != "min_tokens"}, {"min_tokens": CHANGED["min_tokens"]}]
# set by the app: from OpenAI's shapes, and bad_words as the tokenizer makes them
ENGINE_FIELDS = {"max_tokens": 5, "logprobs": 2, "bad_words_token_ids": [[3, 4]]}


def _to_the_engine(body_type, body: dict, extra: dict, **engine_fields) -> list[SamplingParams]:
    """The body decoded as the API worker decodes it, and its parameters as built there (with the engine's
    shapes of OpenAI's fields, `engine_fields`) and as decoded from the ring."""
    decoded = msgspec.json.decode(msgspec.json.encode({**body, **extra, "stop": "END"}), type=body_type)
    params = decoded.sampling_params(**engine_fields)
    wire = msgspec.msgpack.decode(m.encode(m.Generate("r", m.pack_ids([1]), params)), type=m.Generate).sampling
    return [params, wire]


@pytest.mark.parametrize(
    "body_type,extra",
    [(CompletionRequest, {"prompt": "x"}), (ChatRequest, {"messages": [{"role": "user", "content": "x"}]})],
)
def test_every_sampling_field_flows_from_the_body_to_the_engine(body_type, extra):
    assert set(CHANGED) == set(SamplingFields.__struct_fields__)
    for body in BODIES:
        for got in _to_the_engine(body_type, body, extra, **ENGINE_FIELDS):
            for name, value in body.items():
                want = {"logit_bias": {9: -100.0}, "structured_outputs": StructuredOutputs(regex="[ab]+")}.get(
                    name, value
                )
                assert getattr(got, name) == want, name
            assert got.max_tokens == 5 and got.stop == ["END"]


def test_every_request_field_reaches_a_sampler_row_or_what_handles_it():
    """Each field of SamplingParams is read by a row of the sampler's table (engine/sampler/rows.py) or named in
    NOT_SAMPLED with what handles it instead (the stop checks, the text layer, the grammar): a new field with
    neither fails here."""
    fields = set(SamplingParams.__struct_fields__)
    read = {f.param for f in ROW_FIELDS if f.param is not None}
    assert read | set(NOT_SAMPLED) == fields, f"not handled anywhere: {fields - read - set(NOT_SAMPLED)}"
    assert not read & set(NOT_SAMPLED), "a field is read by a row and said to be handled elsewhere"


@pytest.mark.parametrize("name", sorted({f.param for f in ROW_FIELDS if f.param is not None}))
def test_a_changed_field_reaches_its_sampler_row_from_the_body(name):
    """Body -> ring -> the sampler's row table: the changed value lands in each of its columns; a column of a
    stage beyond the fused pass leaves its neutral value, and the row then leaves the fused pass (the rest
    of the decision is checked against the reference in tests/engine/sampler/test_rows.py)."""
    body, engine = ({name: CHANGED[name]}, {}) if name in CHANGED else ({}, {name: ENGINE_FIELDS[name]})
    wire = _to_the_engine(CompletionRequest, body, {"prompt": "x"}, **engine)[1]
    default = _to_the_engine(CompletionRequest, {}, {"prompt": "x"})[1]
    table = RowTable(2)
    table.set([0, 1], [wire, default], [3, 3])
    for f in [f for f in ROW_FIELDS if f.param == name]:
        assert table.host[f.name][0] == f.value(wire, 3), f.name
        if f.stage == KERNEL:  # the kernel reads any value: it must at least differ from the default's
            assert table.host[f.name][0] != table.host[f.name][1], f.name
        else:
            assert table.host[f.name][0] != f.neutral and table.host[f.name][1] == f.neutral, f.name
            assert table.plain(np.array([0, 1])).tolist() == [f.stage == RUNNER, True], f.name


@pytest.mark.parametrize(
    "field,value",
    [
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("frequency_penalty", 2.01),
        ("temperature", float("nan")),
        ("max_tokens", 0),
        ("top_p", 0.0),
        ("stop", [""]),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [-1]),
        ("bad_words", [""]),
        ("bad_words_token_ids", [[]]),
        ("truncate_prompt_tokens", -2),
        ("truncation_side", "middle"),
        ("priority", 2**63),
    ],
)
def test_bounds_are_checked_when_built_and_when_decoded(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    if not (isinstance(value, float) and math.isnan(value)):  # NaN has no JSON round trip worth testing
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.msgpack.decode(msgspec.msgpack.encode({field: value}), type=SamplingParams)


def test_structured_outputs_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    assert StructuredOutputs(json={"type": "object"}).key == ("json", '{"type":"object"}', False)


# Nested objects, enums, arrays and bounded scalars: a bounded schema, so that every output ends well within
# max_tokens (whitespace between elements is bounded by the engine too).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "owner": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ok", "age"],
            "properties": {"ok": {"type": "boolean"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


def test_structured_outputs_travel_whole_on_the_wire():
    from ringllm.ipc import messages as m

    params = SamplingParams(structured_outputs=StructuredOutputs(json=SCHEMA, disable_any_whitespace=True))
    back = msgspec.msgpack.decode(m.encode(m.Generate("r", m.pack_ids([1]), params)), type=m.Generate).sampling
    assert back.structured_outputs == params.structured_outputs and json.loads(back.structured_outputs.json) == SCHEMA
