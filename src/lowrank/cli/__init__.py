"""The ``lowrank`` command: ``finetune``, ``eval``, ``compare``, ``merge``, ``quantize``, ``env``.

* :mod:`lowrank.cli.parser`: argparse, flag checks, the user-error types and the one-line message
  (imports neither torch nor transformers, so ``--help`` and a bad flag answer at once);
* :mod:`lowrank.cli.loading`: models, tokenizers and data for a run (``Run``, ``rebuild``);
* :mod:`lowrank.cli.commands`: one function per command.

Bad input (data, flags, checkpoints) ends with one line ``lowrank: error: ...`` and exit status 2,
before anything is written to the output directory.
"""

from __future__ import annotations

import sys

from lowrank.cli.parser import EXIT_USAGE, CliError, build_parser, one_line, user_errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lowrank.cli.commands import COMMANDS

    try:
        return COMMANDS[args.command](args)
    except user_errors() as e:
        if args.debug:
            raise
        print(one_line(e), file=sys.stderr)
        return EXIT_USAGE


def __getattr__(name: str):
    if name in ("rebuild", "Run"):
        from lowrank.cli import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lowrank.cli' has no attribute {name!r}")


__all__ = ["EXIT_USAGE", "CliError", "main"]
