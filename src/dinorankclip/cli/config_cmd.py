"""``dinorankclip config``: print the resolved config, checking every key and the type and range of each value."""

from __future__ import annotations

from ..config import load_config
from .common import OVERRIDE_HELP

NAME = "config"


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config as YAML (checks key names and value types and "
                                      "ranges; files, model names and weights are checked when a run starts)")
    p.add_argument("--config", metavar="FILE", help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def run(args) -> int:
    print(load_config(args.config, list(args.overrides)).to_yaml(), end="")
    return 0
