"""The `jaxturbo` command line.

Each sub-command lives in its own module under `jaxturbo/cli/` and defines
`NAME`, `HELP` (one line, shown by `jaxturbo --help`), `add_arguments(parser)` and
`run(args) -> int`; modules are discovered, so a new command needs no edit here.  A command
parses flags, builds the library's configs and calls the library; flag names mean one thing
across commands (`jaxturbo.cli.common`).  Every flag's help shows its default.
Bad input raises `UserError`: one line on stderr, exit status 2, no traceback; a library
error's `field=value` is shown as the command's flag (`common.flag_names`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

# transformers (used for tokenizers only) otherwise warns that PyTorch is absent and that a
# whole file's token count exceeds the model context, neither of which applies here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from jaxturbo import __version__
from jaxturbo.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag's help, except where there is nothing to show: a
    required flag, a switch (off by default), a default of None (the help says what it means)
    or a help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default:" in text
            or action.required
            or not action.option_strings
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


def _command_modules() -> list:
    import jaxturbo.cli as pkg

    mods = [
        importlib.import_module(f"{pkg.__name__}.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_")
    ]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxturbo",
        description="LLM-efficiency techniques on JAX meshes: models, generation, perplexity, "
        "tensor/sequence parallelism, MLA conversion, post-training, HF bridge.",
    )
    parser.add_argument("--version", action="version", version=f"jaxturbo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for mod in _command_modules():
        p = sub.add_parser(
            mod.NAME, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxturbo.cli.common import expand_config, flag_names

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if argv and argv[0] in commands:
        try:
            argv = [argv[0], *expand_config(commands[argv[0]], argv[1:])]
        except UserError as e:
            print(f"jaxturbo {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(
            f"jaxturbo {args.command}: error: {flag_names(str(e), args._parser)}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
