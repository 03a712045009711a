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
from pathlib import Path

from lowrank.cli.parser import EXIT_USAGE, CliError, build_parser, check_args, is_user_error, one_line


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
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(one_line(e), file=sys.stderr)
        return EXIT_USAGE


def interrupted(args, error: KeyboardInterrupt) -> str:
    """What a Ctrl-C left behind and how to continue (one line), read from the output directory."""
    if args.command not in ("finetune", "compare"):
        return f"interrupted (Ctrl-C); {args.command} writes nothing until it is done: rerun the command"
    out = Path(args.output)
    log = out / "log.jsonl"
    if args.command == "compare" or not log.is_file():
        where = "before training started" if not log.is_file() else "during training"
        again = "rerun the same command" + (" (with --resume if run.json exists)" if args.command == "finetune" else "")
        if args.command == "compare":
            again = "compare starts over: rerun it with a new --output"
        return f"interrupted (Ctrl-C) {where}: {again}"
    steps = sum(1 for line in log.read_text(encoding="utf-8").splitlines() if line.strip())
    checkpoints = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    kept = f"checkpoint {checkpoints[-1]} is intact" if checkpoints else "no checkpoint had been written yet"
    return f"interrupted (Ctrl-C) after step {steps}; {kept}: rerun the same command with --resume to continue"


def __getattr__(name: str):
    if name in ("rebuild", "Run"):
        from lowrank.cli import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lowrank.cli' has no attribute {name!r}")


__all__ = ["EXIT_USAGE", "CliError", "main"]
