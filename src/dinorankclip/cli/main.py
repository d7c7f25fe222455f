"""Command-line entry point: ``dinorankclip COMMAND``.

Each subcommand lives in its own module with ``NAME``, ``add_parser(subparsers)`` and ``run(args)``;
:data:`COMMANDS` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml
from safetensors import SafetensorError

from ..config import ConfigError
from . import config_cmd, data_cmd, demo_cmd, eval_cmd, export_cmd, study_cmd, teacher_cache_cmd, train_cmd

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = [train_cmd, eval_cmd, study_cmd, export_cmd, demo_cmd, config_cmd, data_cmd, teacher_cache_cmd]


class _DropOpenClipNoise(logging.Filter):
    """Hide open_clip's warning for models built without pretrained weights: training from scratch is the
    normal case here, and ``model.pretrained`` loads weights explicitly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def _setup_logging(verbose: bool) -> None:
    """Log this package at INFO (DEBUG with -v) on rank 0 and WARNING elsewhere; other libraries at WARNING.

    With more than one process every line carries its rank, so a warning about a shard names the process
    that read it.
    """
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    where = f" rank {rank}" if world > 1 else ""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropOpenClipNoise())
    level = logging.DEBUG if verbose else logging.INFO
    logging.getLogger("dinorankclip").setLevel(level if rank == 0 else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinorankclip",
        description="DinoRankCLIP: CLIP pretraining with a frozen DINOv3 teacher and high-order Plackett-Luce "
                    "ranking.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _setup_logging(args.verbose)
    commands = {command.NAME: command.run for command in COMMANDS}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print(f"dinorankclip {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError, RuntimeError, SafetensorError,
            yaml.YAMLError) as err:
        if args.traceback:
            raise
        print(f"dinorankclip {args.command}: error: {_message(err)}\n"
              "(add --traceback before the command for details)", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting KEY=VALUE overrides on both sides of a command's options.

    argparse takes only one contiguous group of positionals, so in ``train a=1 --out X b=2`` it leaves ``b=2``
    unparsed. Such leftovers join the overrides in command-line order, and a later override still wins.
    """
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if extra and not unknown and isinstance(getattr(args, "overrides", None), list):
        args.overrides = args.overrides + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    return args


def _message(err: Exception) -> str:
    """Return the error's message; for an error raised in a DataLoader worker, the worker's own message."""
    text = str(err)
    if text.startswith("Caught ") and " in DataLoader worker process " in text:
        # torch wraps it as "Caught X in DataLoader worker process N.\nOriginal Traceback ...\nX: message".
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, SafetensorError):
        return f"not a readable safetensors file ({err}); give a run folder or its model.safetensors"
    return text


if __name__ == "__main__":
    sys.exit(main())
