"""What the grammar compiler is not given: constraints too large to compile in bounded time and memory, and
JSON-schema keywords xgrammar would accept but not enforce (an output could break them while the request
claims it was constrained). Both are refused by name, before anything is queued: a 400 for the client."""

from __future__ import annotations

import json

MAX_GRAMMAR_BYTES = 64 * 1024  # the text of one constraint (schema, regex, choices or EBNF), UTF-8

# Keywords xgrammar 0.2.9 ignores; `uniqueItems: false` and local `$ref`s ("#/...") are fine.
UNENFORCED = ("not", "if", "then", "else")
# Where a schema's keys are names (of properties, definitions), not keywords: their values are schemas.
NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
DATA = ("enum", "const", "default", "examples")  # plain JSON values, whatever keys they hold


class ConstraintRefused(ValueError):
    """A constraint refused before compiling; the message names the field and the reason."""


def check_constraint(kind: str, text: str) -> None:
    """Raises ConstraintRefused for a constraint too large, or a JSON schema using a keyword we cannot enforce."""
    size = len(text.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise ConstraintRefused(
            f"structured_outputs.{kind}: {size} bytes; this server compiles constraints of at most "
            f"{MAX_GRAMMAR_BYTES} bytes"
        )
    if kind == "json":
        try:
            schema = json.loads(text)
        except RecursionError:
            raise ConstraintRefused("structured_outputs.json: the schema is nested too deeply") from None
        keyword = unenforced_keyword(schema)
        if keyword is not None:
            raise ConstraintRefused(f"structured_outputs.json: the JSON-schema keyword {keyword} is not supported")


def unenforced_keyword(schema: object) -> str | None:
    """The first keyword of `schema` (a parsed JSON schema) that the compiler would not enforce, or None.
    Walked with a stack, not recursion: a deeply nested schema must not raise RecursionError."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in UNENFORCED:
                return repr(key)
            if key == "uniqueItems" and value is not False:
                return "'uniqueItems'"
            if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                return f"'$ref' to {value!r} (only local references, '#/...', are supported)"
            if key in NAMED_SCHEMAS and isinstance(value, dict):
                stack.extend(value.values())
            elif key not in DATA:
                stack.append(value)
    return None
