"""vLLM's command line, accepted by `ringllm serve`: the model as a positional argument (`vllm serve MODEL`) and
the flags vLLM users pass that have no ringllm option of their own. Each one either sets what ringllm's own
option sets, is what ringllm always does (accepted, nothing to set), or asks for what ringllm cannot do (an
error naming it, never ignored). Their help texts say which; scripts/config_reference.py writes them into
README.md. vLLM's names for ringllm's own options (--max-model-len, -tp, ...) are aliases on those options."""

from __future__ import annotations

import argparse

VLLM_GROUP = "vLLM flags"


class _Accepted(argparse.Action):
    """A flag whose vLLM meaning is what ringllm always does: nothing to set."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


class _Refused(argparse.Action):
    """A flag that asks for what ringllm cannot do: an error naming it, its value and why."""

    def __init__(self, option_strings, dest, why: str, nargs=0, **kwargs):
        self.why = why
        super().__init__(option_strings, argparse.SUPPRESS, nargs=nargs, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        given = " ".join([str(option_string), *(values or [])])
        parser.error(f"{given}: {self.why}")


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags, in their own group. None has a RINGLLM_ variable: those that set something set an option
    that has its own."""
    group = parser.add_argument_group(VLLM_GROUP)
    flags = [
        group.add_argument(
            "--enable-prefix-caching",
            action="store_const",
            const=False,
            dest="disable_radix_cache",
            default=argparse.SUPPRESS,
            help="prefix caching is on unless --disable-radix-cache: this turns it back on",
        ),
        group.add_argument(
            "--no-enable-prefix-caching",
            action="store_const",
            const=True,
            dest="disable_radix_cache",
            default=argparse.SUPPRESS,
            help="the same as --disable-radix-cache",
        ),
        group.add_argument(
            "--enable-chunked-prefill",
            action=_Accepted,
            help="accepted: long prompts are always prefilled in chunks (within --max-num-batched-tokens)",
        ),
        group.add_argument(
            "--no-enable-chunked-prefill",
            action=_Refused,
            why="ringllm always prefills long prompts in chunks; it cannot turn that off",
            help="refused: chunked prefill cannot be turned off",
        ),
        group.add_argument(
            "--enable-auto-tool-choice",
            action=_Accepted,
            help="accepted: tool_choice auto is always on (calls are parsed with --tool-call-parser)",
        ),
        group.add_argument(
            "--trust-remote-code",
            action=_Accepted,
            help="accepted: ringllm runs no code from model repositories (its own model classes only)",
        ),
        group.add_argument(
            "--disable-log-requests",
            action=_Accepted,
            help="accepted: ringllm never logs prompts, outputs or sampling parameters (what vLLM's request "
            "log holds); the access line and token counts of each request stay",
        ),
        group.add_argument(
            "--quantization",
            "-q",
            action=_Refused,
            nargs=1,
            metavar="METHOD",
            why="ringllm runs no quantized kernels; serve a full-precision checkpoint (a GGUF file loads "
            "without this flag, dequantized to --dtype)",
            help="refused, whatever the method: no quantized kernels",
        ),
    ]
    for action in flags:
        setattr(action, "no_env", True)  # noqa: B010 (argparse.Action declares no such field)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as `vllm serve MODEL` takes it: the same as --model",
    )


def take_model_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`ringllm serve MODEL` is `ringllm serve --model MODEL`; the command line wins over RINGLLM_MODEL, and
    a different --model beside it is an error (which one was meant?)."""
    tag = vars(args).pop("model_tag", None)
    if tag is None:
        return
    if args.model not in (None, parser.get_default("model"), tag):
        parser.error(f"the model is given twice: {tag} and --model {args.model}")
    args.model = tag
