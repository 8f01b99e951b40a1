"""What the ``plvm`` commands share: the config they load, and how a command and its options are declared."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "local.yaml"


def config_of(args: argparse.Namespace, **overrides):
    """The command's config: ``--config`` (default: the project's ``configs/local.yaml``), with its ``--bank`` and
    the dotted-key ``overrides`` (``input__uri=...``) that are not None."""
    from pipelines.config import load_config

    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(config_path, random_weights=args.random_weights, bank=getattr(args, "bank", None), **overrides)


def command(sub, name: str, handler: Callable, help: str, under=None) -> argparse.ArgumentParser:
    """A subcommand ``name`` of ``under`` (default: ``sub``, the top level), with ``--config``, run by ``handler``."""
    s = (under or sub).add_parser(name, help=help, description=help)
    s.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name} of this project)")
    s.add_argument("--random-weights", action="store_true",
                   help="confirm a config with models.random_weights: true (every model with random weights; the "
                        "output is noise, and marked so); such a config is refused without it")  # fmt: skip
    s.set_defaults(handler=handler)
    return s


def add_face_policy(s: argparse.ArgumentParser) -> None:
    s.add_argument("--face-policy", choices=["largest", "centre"], default="largest",
                   help="reference face of a photo with several: largest, one at least twice as large as the others "
                        "(else refused; the default), or centre, the one nearest the photo's centre")  # fmt: skip
