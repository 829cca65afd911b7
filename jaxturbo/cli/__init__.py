"""The `jaxturbo` command line.

Each sub-command lives in its own module under `jaxturbo/cli/` and defines
`NAME`, `HELP` (one line, shown by `jaxturbo --help`), `add_arguments(parser)` and
`run(args) -> int`; modules are discovered, so a new command needs no edit here.
Bad input raises `UserError`: one line on stderr, exit status 2, no traceback.
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

from jaxturbo.errors import UserError


def _command_modules() -> list:
    import jaxturbo.cli as pkg
    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxturbo",
        description="LLM-efficiency techniques on JAX meshes: models, generation, perplexity, "
                    "tensor/sequence parallelism, MLA conversion, post-training, HF bridge.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"jaxturbo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
