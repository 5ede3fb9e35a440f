"""Writes the configuration reference in README.md from the CLI's own parser, so the two cannot drift apart
(tests/scripts/test_config_reference.py fails when they do): the table of options, and the table of vLLM's flags
(ringllm/serve/vllm_flags.py).

    python scripts/config_reference.py          # rewrite the block between the markers
    python scripts/config_reference.py --check  # exit 1 if the README is out of date"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ringllm.serve.options import env_name  # noqa: E402
from ringllm.serve.parser import build_parser, subparser  # noqa: E402
from ringllm.serve.vllm_flags import VLLM_GROUP  # noqa: E402

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
VLLM_BEGIN, VLLM_END = "<!-- vllm-flags:begin -->", "<!-- vllm-flags:end -->"


def _serve_parser() -> argparse.ArgumentParser:
    return subparser(build_parser(), "serve")


def _options(vllm: bool) -> list[argparse.Action]:
    """The serve options of the main table (vllm=False: every option but help, version, the positional MODEL
    and vLLM's flags), or of the vLLM table."""
    out = []
    for group in _serve_parser()._action_groups:
        if (group.title == VLLM_GROUP) != vllm:
            continue
        for action in group._group_actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                out.append(action)
    return out


def _default(action: argparse.Action) -> str:
    if getattr(action, "default_text", None):
        return action.default_text
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or action.default == []:
        return "—"
    return f"`{action.default}`"


def _names(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    return names + (f" `{action.metavar}`" if action.metavar and action.nargs != 0 else "")


def render() -> str:
    """The declared defaults (build_parser does not read the environment; only main() does)."""
    lines = [BEGIN, "", "| option | environment | default | what it does |", "|---|---|---|---|"]
    for action in _options(vllm=False):
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        help_text = (action.help or "").replace("|", "/")
        if action.choices:
            help_text += ": " + ", ".join(map(str, action.choices))
        lines.append(f"| {names} | `{env_name(action)}` | {_default(action)} | {help_text} |")
    return "\n".join(lines + ["", END])


def render_vllm() -> str:
    lines = [VLLM_BEGIN, "", "| vLLM flag | what ringllm does |", "|---|---|"]
    for action in _options(vllm=True):
        lines.append(f"| {_names(action)} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(lines + ["", VLLM_END])


def current(readme: str, begin: str = BEGIN, end: str = END) -> str:
    start, stop = readme.index(begin), readme.index(end) + len(end)
    return readme[start:stop]


def main() -> int:
    path = ROOT / "README.md"
    readme = path.read_text()
    blocks = [(render(), BEGIN, END), (render_vllm(), VLLM_BEGIN, VLLM_END)]
    if "--check" in sys.argv:
        if any(current(readme, begin, end) != fresh for fresh, begin, end in blocks):
            print("README.md's configuration reference is out of date: run python scripts/config_reference.py")
            return 1
        return 0
    for fresh, begin, end in blocks:
        readme = readme.replace(current(readme, begin, end), fresh)
    path.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
