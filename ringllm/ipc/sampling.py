"""The request contract: what a request asks of the sampler and of the stop checks, declared once.

`SamplingFields` are the knobs an OpenAI body carries as they are (app/schemas.py's bodies take them from here,
each nullable for unset, so the HTTP schema, the OpenAPI document and the bounds come from here). `SamplingParams` adds the fields whose OpenAI
shape differs (max_tokens, stop, logprobs) and is what travels on the ring, what the scheduler and the sampler
read, and what the offline API takes. The bounds are msgspec `Meta` annotations: msgspec checks them when a body
or a ring message is decoded, and `__post_init__` checks the same annotations when Python code builds one, so
there is no second list of limits. No torch here: the API workers import this too.

Adding a sampling field: declare it here with its bounds, read it in the sampler (an entry of
engine/sampler/rows.py's ROW_FIELDS and the math in engine/sampler/sampler.py), and test it
(tests/ipc/test_sampling.py fails for a field that does not reach the sampler)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ringllm.text.lark import LarkError, is_lark, lark_to_ebnf

MAX_STOP_SEQUENCES = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # tokens per request, as OpenAI allows
MAX_BAD_WORDS = 128  # token sequences per request once tokenized, as vLLM allows (VLLM_MAX_NUM_BAD_WORDS)
MAX_BAD_WORDS_TOKENS = 1024  # their tokens in all (vLLM's VLLM_MAX_BAD_WORDS_TOTAL_TOKENS)

Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
LogprobCount = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]
Text = Annotated[str, Meta(min_length=1)]
TokenSequence = Annotated[list[TokenId], Meta(min_length=1)]

CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class FieldError(ValueError):
    """A request field whose value cannot be served: `field` names it (the OpenAI error's `param`), the message
    says why. A ValueError, so that msgspec turns one raised while decoding into a ValidationError."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StructuredOutputs(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Constrains a request's output to a grammar (vLLM's `structured_outputs`): exactly one of `json` (a JSON
    schema, as an object or its text), `json_object` (any JSON object), `regex`, `choice` (one of these strings)
    or `grammar` (EBNF in xgrammar's dialect). The engine ends the request when the grammar is complete."""

    json: str | dict | None = None
    json_object: bool | None = None
    regex: Text | None = None
    choice: Annotated[list[str], Meta(min_length=1)] | None = None
    grammar: Text | None = None
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens beyond single separators

    def __post_init__(self) -> None:
        check_declared(self, "structured_outputs.")
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise FieldError(
                "structured_outputs",
                f"structured_outputs takes exactly one of {', '.join(CONSTRAINT_KINDS)}; got "
                f"{', '.join(given) or 'none'}",
            )
        if self.grammar is not None and is_lark(self.grammar):  # vLLM's clients may write Lark (text/lark.py)
            try:
                self.grammar = lark_to_ebnf(self.grammar)
            except LarkError as e:
                raise FieldError("structured_outputs.grammar", f"structured_outputs.grammar (Lark): {e}") from None
        if isinstance(self.json, dict):  # the engine compiles (and caches) by the schema's text
            try:
                self.json = msgspec.json.encode(self.json).decode()
            except RecursionError:
                raise FieldError("structured_outputs.json", "structured_outputs.json is nested too deeply") from None
        elif isinstance(self.json, str):
            try:
                schema = msgspec.json.decode(self.json)
            except RecursionError:
                raise FieldError("structured_outputs.json", "structured_outputs.json is nested too deeply") from None
            except msgspec.DecodeError:
                raise FieldError(
                    "structured_outputs.json",
                    "structured_outputs.json must be a JSON schema (an object or its JSON text)",
                ) from None
            if not isinstance(schema, (dict, bool)):
                # ValueError, not TypeError: decoding turns it into a ValidationError; callers catch ValueError
                raise FieldError("structured_outputs.json", "structured_outputs.json must be a JSON schema: an object")

    @property
    def kind(self) -> str:
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What a compiled grammar is cached under: (kind, its text, whitespace rule)."""
        kind = self.kind
        spec = {
            "json": self.json,
            "json_object": "",
            "regex": self.regex,
            "grammar": self.grammar,
            "choice": msgspec.json.encode(self.choice).decode() if self.choice else "",
        }[kind]
        assert isinstance(spec, str)  # the given kind's text (__post_init__ made a schema object its text)
        return kind, spec, self.disable_any_whitespace


class SamplingFields(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The sampling knobs an OpenAI body carries unchanged."""

    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0  # 0: greedy
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = -1  # -1 or 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: Int64 | None = None
    # Penalties stay in ranges that keep the arithmetic finite: a repetition penalty near 0 divides logits past
    # float32's range (1e-300 turned every logit into inf/NaN and every token into id 0).
    repetition_penalty: Annotated[float, Meta(ge=0.01, le=2.0)] = 1.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    ignore_eos: bool = False
    # vLLM's min_tokens: neither EOS nor stop_token_ids can end the output before this many tokens are out
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = []  # None: []
    # token id -> added to its logit before sampling (greedy too): -100 bans a token, +100 all but forces it
    logit_bias: Annotated[dict[TokenId, Bias], Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's allowed_token_ids: every other token is banned (greedy too)
    allowed_token_ids: Annotated[list[TokenId], Meta(min_length=1)] | None = None
    # vLLM's bad_words: the token sequences of each word (with and without a leading space) are never completed.
    # The side that holds the tokenizer turns them into bad_words_token_ids (text/bad_words.py), which the
    # sampler reads.
    bad_words: Annotated[list[Text], Meta(max_length=MAX_BAD_WORDS)] = []
    # None: off; k: each prompt token's logprob given the tokens before it, with its rank and the top k there.
    # Such a request computes its whole prompt (no prefix-cache hit), since cached positions have no logits.
    prompt_logprobs: LogprobCount | None = None
    # vLLM's priority (lower is served first): only with --scheduling-policy priority; 0 is the default
    priority: Int64 = 0
    # vLLM's truncate_prompt_tokens: keep only k tokens of the prompt (-1: as many as the context holds beside
    # max_tokens), cut on `truncation_side` ("left", the default, keeps the last k). Applied where the prompt is
    # tokenized (`truncated_prompt`), before the engine sees it.
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None

    def truncated_prompt(self, ids: list[int], max_input: int) -> list[int]:
        """The prompt as truncate_prompt_tokens asks (`truncate_prompt`)."""
        return truncate_prompt(ids, self.truncate_prompt_tokens, self.truncation_side, max_input)


def truncate_prompt(ids: list[int], keep: int | None, side: str | None, max_input: int) -> list[int]:
    """The prompt as truncate_prompt_tokens `keep` asks (`max_input`: the most prompt tokens the context holds
    beside the output), cut on `side`; raises FieldError for a truncation beyond that or one that keeps nothing."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max_input
    elif keep > max_input:
        raise FieldError(
            "truncate_prompt_tokens",
            f"truncate_prompt_tokens {keep} is more than the {max_input} prompt tokens the context holds "
            "beside max_tokens",
        )
    if keep < 1:
        raise FieldError("truncate_prompt_tokens", "truncate_prompt_tokens keeps no prompt token")
    if len(ids) <= keep:
        return ids
    return ids[:keep] if side == "right" else ids[len(ids) - keep :]


class SamplingParams(SamplingFields, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One request's parameters, as the engine schedules them."""

    max_tokens: Annotated[int, Meta(ge=1)] = 16
    stop: Annotated[list[Text], Meta(max_length=MAX_STOP_SEQUENCES)] = []  # matched on text by the detokenizer
    logprobs: LogprobCount | None = None  # None: off; k: the chosen token's logprob and the top k
    # bad_words as token sequences (None: not tokenized yet; the engine refuses bad_words without them): the
    # last token of each is banned where the output so far ends with the ones before it
    bad_words_token_ids: Annotated[list[TokenSequence], Meta(max_length=MAX_BAD_WORDS)] | None = None

    def __post_init__(self) -> None:
        """Checks the declared bounds when Python code builds one (decoding checked them already); raises
        FieldError naming the first bad field."""
        check_declared(self)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.min_tokens and self.structured_outputs is not None:
            # the grammar decides where a constrained output ends; a floor on its length could contradict it
            raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides the end")
        if self.bad_words_token_ids and sum(map(len, self.bad_words_token_ids)) > MAX_BAD_WORDS_TOKENS:
            raise FieldError("bad_words", f"bad_words make more than {MAX_BAD_WORDS_TOKENS} tokens in all")


def check_token_ids(
    vocab_size: int, prompts: Iterable[Sequence[int]] = (), params: SamplingParams | None = None, field: str = "prompt"
) -> None:
    """Raises FieldError naming the first field that holds a token id outside [0, vocab_size): the prompts'
    ids (under `field`), then the ids the parameters name. The API worker and the engine both call this one
    check, so a new token-id field is listed here only."""
    named: list[tuple[str, Iterable[int]]] = [(field, ids) for ids in prompts]
    if params is not None:
        named += [
            ("logit_bias", params.logit_bias or ()),
            ("stop_token_ids", params.stop_token_ids or ()),
            ("allowed_token_ids", params.allowed_token_ids or ()),
            ("bad_words", [t for word in params.bad_words_token_ids or () for t in word]),
        ]
    for name, ids in named:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            # vLLM's words ("out of vocabulary"), which its clients and tests match, and the ids the model has
            raise FieldError(
                name, f"{name}: token id {bad} is out of vocabulary (the model's ids are [0, {vocab_size}))"
            )


# ---- checking values against the declared msgspec types ----
_declared: dict[type, list] = {}


def check_declared(obj: msgspec.Struct, prefix: str = "") -> None:
    """Raises FieldError naming the first field of `obj` whose value does not fit its declared type and bounds."""
    cls = type(obj)
    if cls not in _declared:
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        _declared[cls] = [(f.name, f.type) for f in info.fields]
    for name, kind in _declared[cls]:
        why = _violation(getattr(obj, name), kind)
        if why is not None:
            got = repr(getattr(obj, name))
            shown = got if len(got) <= 80 else got[:77] + "..."
            raise FieldError(prefix + name, f"{prefix}{name} must be {why}, got {shown}")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(t) -> str:
    low = f"[{_num(t.ge)}" if t.ge is not None else f"({_num(t.gt)}" if t.gt is not None else None
    high = f"{_num(t.le)}]" if t.le is not None else f"{_num(t.lt)})" if t.lt is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if t.ge is not None else '>'} {low[1:]}"
    if high:
        return f" {'<=' if t.le is not None else '<'} {high[:-1]}"
    return ""


def _violation(value: Any, t) -> str | None:
    """None if `value` fits the msgspec type `t` (from msgspec.inspect), else what it must be."""
    i = msgspec.inspect
    if isinstance(t, i.UnionType):
        whys = [_violation(value, member) for member in t.types]
        return None if None in whys else " or ".join(w for w in whys if w)
    if isinstance(t, i.NoneType):
        return None if value is None else "null"
    if isinstance(t, i.BoolType):
        return None if isinstance(value, bool) else "a boolean"
    if isinstance(t, (i.IntType, i.FloatType)):
        want = f"{'an integer' if isinstance(t, i.IntType) else 'a number'}{_range(t)}"
        types = int if isinstance(t, i.IntType) else (int, float)
        if isinstance(value, bool) or not isinstance(value, types):
            return want
        ok = (
            (t.ge is None or value >= t.ge)
            and (t.gt is None or value > t.gt)
            and (t.le is None or value <= t.le)
            and (t.lt is None or value < t.lt)
        )
        return None if ok else want  # NaN fails every comparison, so it is refused too
    if isinstance(t, i.StrType):
        ok = isinstance(value, str) and len(value) >= (t.min_length or 0)
        return None if ok else "a non-empty string" if t.min_length else "a string"
    if isinstance(t, (i.ListType, i.DictType)):
        container = list if isinstance(t, i.ListType) else dict
        if not isinstance(value, container):
            return f"a{' list' if container is list else ' map'}"
        if t.max_length is not None and len(value) > t.max_length:
            return f"at most {t.max_length} items"
        if t.min_length is not None and len(value) < t.min_length:
            return f"at least {t.min_length} items"
        items: Iterable[tuple[Any, Any]]
        if isinstance(t, i.ListType):
            items = ((t.item_type, x) for x in value)
        else:
            assert isinstance(value, dict)
            items = [(t.key_type, k) for k in value] + [(t.value_type, v) for v in value.values()]
        for kind, x in items:
            why = _violation(x, kind)
            if why is not None:
                return f"made of items that are {why}"
        return None
    if isinstance(t, i.LiteralType):
        return None if value in t.values else f"one of {', '.join(map(repr, t.values))}"
    if isinstance(t, i.StructType):
        return None if isinstance(value, t.cls) else f"a {t.cls.__name__}"
    return None  # Any and other open types
