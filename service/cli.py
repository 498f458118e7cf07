"""The `convserve` command line: one entry point for both halves.

Subcommands that need torch (train, export, arithmetic on a zoo name) import it only when they
run, so `convserve serve` works in the serving container, which has no torch.
Every expected failure is a `UsageError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


Handler = Callable[[argparse.Namespace], int]
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `configure` adds its arguments, the decorated function runs it."""
    def wrap(handler: Handler) -> Handler:
        _COMMANDS.append((name, help_text, configure, handler))
        return handler
    return wrap


# ---- arithmetic --------------------------------------------------------------------------------

def _arithmetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="NAME_OR_ONNX_FILE", help="a zoo model name or a path to an .onnx file")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the model's own, e.g. 3x224x224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default: its own)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--all", action="store_true", help="show every layer, activations included")
    p.add_argument("--paper", action="store_true", help="googlenet only: Table 1 of the paper beside our numbers")


@command("arithmetic", "per-layer output shapes, parameters, MACs and receptive fields", _arithmetic_args)
def _arithmetic(args: argparse.Namespace) -> int:
    from models import arithmetic as ar

    try:
        shape = ar.parse_input_shape(args.input) if args.input else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError("--num-classes must be at least 1")
    looks_like_file = os.path.sep in args.model or args.model.endswith(".onnx") or os.path.exists(args.model)
    if looks_like_file:
        if not os.path.isfile(args.model):
            raise UsageError(f"no such file: {args.model}")
        try:
            nodes, file_shape = ar.from_onnx(args.model)
        except ar.NotOnnxError as exc:
            raise UsageError(str(exc)) from None
        if shape is not None and tuple(shape) != tuple(file_shape):
            raise UsageError(f"{args.model} takes {'x'.join(map(str, file_shape))} inputs; --input cannot change that")
        table = ar.analyze(nodes, file_shape)
        title = args.model
    else:
        model = _zoo_model(args.model, num_classes=args.num_classes,
                           in_channels=shape[0] if shape else None)
        from models.arithmetic_torch import analyze_module
        shape = shape or model.default_input
        try:
            table = analyze_module(model, shape)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{args.model} cannot take a {'x'.join(map(str, shape))} input: {exc}".splitlines()[0]) from None
        title = f"{args.model} on {'x'.join(map(str, shape))}"
    if args.paper:
        if args.model != "googlenet" or tuple(table.input_shape) != (3, 224, 224):
            raise UsageError("--paper compares with GoogLeNet's Table 1: use `arithmetic googlenet --paper`")
        from models.paper import compare, format_comparison
        rows = compare(table)
        if args.json:
            print(json.dumps({**table.to_dict(), "paper": [
                {**vars(r), "marked": r.marked} for r in rows]}))
        else:
            print(format_comparison(rows))
        return 0
    print(json.dumps(table.to_dict()) if args.json else ar.format_table(table, title=title, show_all=args.all))
    return 0


def _zoo_model(name: str, **kwargs):
    """A zoo model by name, with only the keyword arguments that were given."""
    try:
        from models.zoo import get_model
    except ImportError:
        raise UsageError("this command needs the training half: pip install 'convserve[train]'") from None
    try:
        return get_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# ---- entry point -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = _Parser(prog="convserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, configure, handler in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def _load_commands() -> None:
    # The modules that define the other subcommands register them on import; none imports torch.
    from . import commands  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        print(f"convserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `convserve ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
