"""Writes the configuration reference in README.md from the CLI's own parser, so the two cannot drift apart
(tests/test_clients.py fails when they do).

    python scripts/config_reference.py          # rewrite the block between the markers
    python scripts/config_reference.py --check  # exit 1 if the README is out of date"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ringllm.app.cli import build_parser  # noqa: E402
from ringllm.app.options import env_name  # noqa: E402

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _default(action: argparse.Action) -> str:
    if getattr(action, "default_text", None):
        return action.default_text
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or action.default == []:
        return "—"
    return f"`{action.default}`"


def render() -> str:
    """The declared defaults (build_parser does not read the environment; only main() does)."""
    lines = [BEGIN, "", "| option | environment | default | what it does |", "|---|---|---|---|"]
    for group in _serve_parser()._action_groups:
        for action in group._group_actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            names = ", ".join(f"`{o}`" for o in action.option_strings)
            help_text = (action.help or "").replace("|", "/")
            if action.choices:
                help_text += ": " + ", ".join(map(str, action.choices))
            lines.append(f"| {names} | `{env_name(action)}` | {_default(action)} | {help_text} |")
    return "\n".join(lines + ["", END])


def current(readme: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[start:end]


def main() -> int:
    path = ROOT / "README.md"
    readme = path.read_text()
    fresh = render()
    if "--check" in sys.argv:
        if current(readme) != fresh:
            print("README.md's configuration reference is out of date: run python scripts/config_reference.py")
            return 1
        return 0
    path.write_text(readme.replace(current(readme), fresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
