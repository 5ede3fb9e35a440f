"""vLLM's clients may write a grammar (`structured_outputs.grammar`, `guided_grammar`) in Lark's syntax; xgrammar
compiles EBNF. A grammar without a `::=` rule is read as Lark and rewritten rule by rule into the EBNF that
xgrammar takes: `name: ...` becomes `name ::= ...` (the `start` rule, else the first, becomes `root`), Lark's
optional `[x]`, repetition `x ~ n..m`, character range `"a".."z"`, case-insensitive `"ab"i` and regular
expressions `/[0-9]+/` become their EBNF forms, and rule prefixes, priorities and aliases (which shape Lark's
parse tree, not the language) are dropped. What has no EBNF counterpart (`%ignore`, `%import`, templates, regex
flags) is refused by name: a grammar that allowed more or less than the client wrote would be wrong silently.
Torch-free and dependency-free: the request contract (ipc/sampling.py) converts as it decodes a request."""

from __future__ import annotations

import re

RULE = re.compile(r"^\s*[?!]?(?P<name>[A-Za-z_]\w*)(?:\.-?\d+)?\s*:(?!:)(?P<body>.*)$")
TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<comment>//[^\n]*)
    |(?P<string>"(?:[^"\\]|\\.)*"i?)|(?P<regex>/(?:[^/\\\n]|\\.)+/[a-z]*)
    |(?P<name>[A-Za-z_]\w*)|(?P<range>\.\.)|(?P<number>\d+)|(?P<alias>->)
    |(?P<op>[()\[\]|*+?~{},])""",
    re.VERBOSE,
)
# Regex escapes with an EBNF character class of their own.
CLASS_ESCAPES = {"d": "[0-9]", "w": "[a-zA-Z0-9_]", "s": "[ \\t\\n\\r\\f\\v]", "D": "[^0-9]", "W": "[^a-zA-Z0-9_]"}


class LarkError(ValueError):
    """A Lark grammar that has no EBNF equivalent here (the message says which construct)."""


def is_lark(grammar: str) -> bool:
    """Lark, as vLLM tells it: no line defines a rule with `::=`, and some line defines one with `:`."""
    lines = [line for line in grammar.splitlines() if not line.lstrip().startswith("//")]
    return not any("::=" in line for line in lines) and any(RULE.match(line) for line in lines)


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar (LarkError when it uses what EBNF cannot say)."""
    rules: list[tuple[str, str]] = []
    for number, line in enumerate(grammar.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        if stripped.startswith("%"):
            directive = stripped.split()[0]
            raise LarkError(f"line {number}: Lark's {directive} has no EBNF counterpart (write the rule out instead)")
        if stripped.startswith("|"):  # an alternative continued from the rule above
            if not rules:
                raise LarkError(f"line {number}: an alternative before any rule")
            rules[-1] = (rules[-1][0], rules[-1][1] + " " + stripped)
            continue
        match = RULE.match(line)
        if match is None:
            raise LarkError(f"line {number}: expected `name: expansion`, got {stripped!r}")
        rules.append((match["name"], match["body"]))
    if not rules:
        raise LarkError("the grammar defines no rule")
    names = {name for name, _ in rules}
    root = "start" if "start" in names else rules[0][0]
    rename = {root: "root"} if root != "root" else {}
    if "root" in names and root != "root":
        rename["root"] = "root_"  # a rule Lark calls root, out of the way of EBNF's
    out = []
    for name, body in rules:
        expansion = _expansion(body, rename, name)
        if not expansion.strip():
            raise LarkError(f"rule {name!r} is empty")
        out.append(f"{rename.get(name, name)} ::= {expansion}")
    return "\n".join(out) + "\n"


def _tokens(body: str, rule: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    while at < len(body):
        match = TOKEN.match(body, at)
        if match is None:
            raise LarkError(f"rule {rule!r}: unexpected {body[at : at + 10]!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
        at = match.end()
    return tokens


def _expansion(body: str, rename: dict[str, str], rule: str) -> str:
    tokens = _tokens(body, rule)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "string" and i + 2 < len(tokens) and tokens[i + 1][0] == "range":
            out.append(_char_range(text, tokens[i + 2][1], rule))
            i += 3
            continue
        if kind == "string":
            out.append(_string(text))
        elif kind == "regex":
            out.append(_regex(text, rule))
        elif kind == "name":
            out.append(rename.get(text, text))
        elif kind == "alias":  # `-> name` names the parse-tree node: nothing in the language
            i += 2
            continue
        elif text == "[":
            out.append("(")
        elif text == "]":
            out.append(")?")
        elif text == "~":
            i, repeat = _repeat(tokens, i, rule)
            out[-1] = out[-1] + repeat if out else repeat
            continue
        elif text in "{},":
            raise LarkError(f"rule {rule!r}: Lark templates ({text!r}) have no EBNF counterpart")
        else:
            out.append(text)
        i += 1
    return " ".join(out).replace(" )?", ")?").replace("( ", "(")


def _repeat(tokens: list[tuple[str, str]], i: int, rule: str) -> tuple[int, str]:
    """`x ~ n` or `x ~ n..m`: the index after it and its EBNF `{n}` / `{n,m}`."""
    if i + 1 >= len(tokens) or tokens[i + 1][0] != "number":
        raise LarkError(f"rule {rule!r}: `~` takes a count")
    low = tokens[i + 1][1]
    if i + 3 < len(tokens) and tokens[i + 2][0] == "range" and tokens[i + 3][0] == "number":
        return i + 4, f"{{{low},{tokens[i + 3][1]}}}"
    return i + 2, f"{{{low}}}"


def _literal(text: str) -> str:
    """The characters of a Lark string literal (its escapes are Python's)."""
    body = text[1:-2] if text.endswith('"i') else text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), body)


def _quoted(chars: str) -> str:
    return '"' + chars.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _string(text: str) -> str:
    chars = _literal(text)
    if not text.endswith('"i'):
        return _quoted(chars)
    # Case-insensitive: each letter either case.
    parts = [f"[{c.lower()}{c.upper()}]" if c.lower() != c.upper() else _quoted(c) for c in chars]
    return "(" + " ".join(parts) + ")" if parts else '""'


def _char_range(low: str, high: str, rule: str) -> str:
    a, b = _literal(low), _literal(high)
    if len(a) != 1 or len(b) != 1:
        raise LarkError(f"rule {rule!r}: a range takes one character each side, got {low}..{high}")
    return f"[{_class_char(a)}-{_class_char(b)}]"


def _class_char(c: str) -> str:
    return "\\" + c if c in "]\\^-" else {"\n": "\\n", "\t": "\\t"}.get(c, c)


def _regex(text: str, rule: str) -> str:
    """A Lark regex as EBNF: character classes, groups, alternatives and quantifiers carry over; \\d \\w \\s and
    `.` become classes; any other character is a one-character string."""
    end = text.rindex("/")
    pattern, flags = text[1:end], text[end + 1 :]
    if flags:
        raise LarkError(f"rule {rule!r}: regex flags ({flags}) have no EBNF counterpart")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            close = _class_end(pattern, i, rule)
            out.append(pattern[i : close + 1])
            i = close + 1
            continue
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            out.append(CLASS_ESCAPES.get(e) or _quoted({"n": "\n", "t": "\t", "r": "\r"}.get(e, e)))
            i += 2
            continue
        if c == "{":
            close = pattern.find("}", i)
            if close < 0 or not re.fullmatch(r"\d+(,\d*)?", pattern[i + 1 : close]):
                raise LarkError(f"rule {rule!r}: regex {text} has a `{{` that is not a count")
            out.append(pattern[i : close + 1])
            i = close + 1
            continue
        if c in "()|*+?":
            if (c == "?" and out and out[-1] in ("*", "+", "?")) or pattern.startswith("(?", i):
                raise LarkError(f"rule {rule!r}: regex {text} uses lazy or special groups, which EBNF lacks")
            out.append(c)
        elif c == ".":
            out.append("[^\\n]")
        elif c in "^$":
            raise LarkError(f"rule {rule!r}: regex anchors ({c}) have no EBNF counterpart")
        else:
            out.append(_quoted(c))
        i += 1
    return "(" + " ".join(out) + ")"


def _class_end(pattern: str, start: int, rule: str) -> int:
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    if i >= len(pattern):
        raise LarkError(f"rule {rule!r}: a regex character class is not closed")
    return i
