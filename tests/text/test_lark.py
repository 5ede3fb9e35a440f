"""text/lark.py: vLLM's Lark grammars become the EBNF xgrammar compiles, accepting the same strings."""

from __future__ import annotations

import msgspec
import pytest

from ringllm.ipc.sampling import FieldError, StructuredOutputs
from ringllm.text.lark import LarkError, is_lark, lark_to_ebnf

SQL = """
start: select_statement
select_statement: "SELECT" column "from" table "where" condition
column: "col_1" | "col_2"
table: "table_1" | "table_2"
condition: column "=" number
number: "1" | "2"
"""

FEATURES = """// a comment line
?start: item+ -> items
item: WORD [","] | NUM ~ 2..3
    | "x"i "a".."f"   // trailing comment
WORD: /[a-z]+\\d?/
NUM: /(0|[1-9][0-9]*)\\.?/
"""


def _accepts(ebnf: str, text: str) -> bool:
    """Whether xgrammar's matcher (no tokenizer: byte level) accepts `text` as a whole sentence of `ebnf`."""
    xgrammar = pytest.importorskip("xgrammar")
    compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([])).compile_grammar(ebnf)
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


def test_vllms_sql_grammar_becomes_ebnf_with_start_as_root():
    assert is_lark(SQL) and not is_lark(lark_to_ebnf(SQL))
    ebnf = lark_to_ebnf(SQL)
    assert ebnf.splitlines()[0] == "root ::= select_statement"
    assert 'column ::= "col_1" | "col_2"' in ebnf
    assert _accepts(ebnf, "SELECTcol_1fromtable_2wherecol_2=1")
    assert not _accepts(ebnf, "SELECTcol_3fromtable_2wherecol_2=1")


@pytest.mark.parametrize(
    "text,ok",
    [
        ("abc,ab1", True),  # WORD with an optional comma, twice
        ("12.7.", True),  # NUM ~ 2..3: "12." then "7."
        ("Xc", True),  # "x"i then a..f
        ("Xg", False),  # g is outside "a".."f" (and WORD is lower case)
        ("5", False),  # one NUM: fewer than 2
        ("", False),  # item+ needs one
    ],
)
def test_lark_constructs_keep_their_language(text, ok):
    assert _accepts(lark_to_ebnf(FEATURES), text) is ok


def test_an_ebnf_grammar_is_not_lark():
    assert not is_lark('root ::= "a" | "b"\n')
    assert not is_lark("// only: a comment")


@pytest.mark.parametrize(
    "grammar,message",
    [
        ("start: WORD\n%ignore WS\n", "%ignore"),
        ("start: WORD\n%import common.WORD\n", "%import"),
        ("start: /a/i\n", "regex flags"),
        ("start: /^a/\n", "anchors"),
        ("start: _sep{x}\n", "templates"),
        ('start: "ab".."z"\n', "one character"),
        ('| "a"\n', "before any rule"),
    ],
)
def test_what_ebnf_cannot_say_is_refused_by_name(grammar, message):
    with pytest.raises(LarkError, match=message):
        lark_to_ebnf(grammar)


def test_the_request_contract_converts_lark_and_names_the_field_when_it_cannot():
    constraint = msgspec.convert({"grammar": SQL}, StructuredOutputs)
    assert constraint.grammar == lark_to_ebnf(SQL)
    ebnf = 'root ::= "a"\n'
    assert msgspec.convert({"grammar": ebnf}, StructuredOutputs).grammar == ebnf  # EBNF untouched
    with pytest.raises(msgspec.ValidationError, match="Lark.*%ignore") as e:
        msgspec.convert({"grammar": "start: A\n%ignore A\n"}, StructuredOutputs)
    cause = e.value.__cause__ or e.value.__context__
    assert isinstance(cause, FieldError) and cause.field == "structured_outputs.grammar"
