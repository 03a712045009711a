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

from lowrank.cli.parser import EXIT_USAGE, CliError, build_parser, check_args, one_line, user_errors


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        check_args(args)  # flags and --output, before torch or a model loads
        from lowrank.cli.commands import COMMANDS

        return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"lowrank: error: {interrupted(args, e)}", file=sys.stderr)
        return EXIT_USAGE
    except user_errors() as e:
        if args.debug:
            raise
        print(one_line(e), file=sys.stderr)
        return EXIT_USAGE


def interrupted(args, error: KeyboardInterrupt) -> str:
    """What a Ctrl-C left behind and how to continue (one line)."""
    if args.command not in ("finetune", "compare"):
        return f"interrupted (Ctrl-C); {args.command} writes nothing until it is done: rerun the command"
    step = getattr(error, "step", None)
    if step is None:
        return "interrupted (Ctrl-C) before training started: rerun the same command (add --resume if run.json exists)"
    checkpoint = getattr(error, "checkpoint", None)
    kept = f"checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint had been written yet"
    how = "rerun the same command with --resume to continue"
    if args.command == "compare":
        how = "compare starts over: rerun it with a new --output (finetune --resume continues a single run)"
    return f"interrupted (Ctrl-C) at step {step} of {error.total_steps}; {kept}: {how}"


def __getattr__(name: str):
    if name in ("rebuild", "Run"):
        from lowrank.cli import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lowrank.cli' has no attribute {name!r}")


__all__ = ["EXIT_USAGE", "CliError", "main"]
