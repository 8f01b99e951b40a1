"""``plvm dataset``: training and evaluation sets from a caption run's output."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict

from pipelines.cli.common import command, config_of


def cmd_dataset(args: argparse.Namespace) -> int:
    from operators.items import check_formats, parse_splits
    from pipelines.dataset import build_dataset

    kinds = check_formats([f.strip() for given in args.format for f in given.split(",")]) if args.format else None
    config = config_of(
        args,
        dataset__formats=kinds,
        dataset__splits=parse_splits(args.split) if args.split is not None else None,
        dataset__split_by=args.split_by,
        dataset__seed=args.seed,
        dataset__negatives=args.negatives,
    )
    summary = build_dataset(config, args.output, args.out, users=args.user, truth_path=args.truth,
                            resume=args.resume, overwrite=args.overwrite,
                            command=shlex.join(["plvm", *args.argv]))  # fmt: skip
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def add(sub) -> None:
    """Declare the command under ``sub``."""
    s = command(sub, "dataset", cmd_dataset, "build personalized training and evaluation sets (LLaVA, Hugging Face "
                "Parquet, LLaMA-Factory, PLVM's evaluation layout) from a caption run's output")  # fmt: skip
    s.add_argument("output", help="a caption run's output folder URI (with its face index)")
    s.add_argument("--out", required=True, help="the dataset's folder (new or empty; or a build to --resume)")
    s.add_argument("--format", action="append",
                   help="llava, hf, llamafactory, plvm-eval; repeat it or separate by commas (default: all)")  # fmt: skip
    s.add_argument("--user", action="append", help="only this user's photos and people (repeatable; default: all)")
    s.add_argument("--split", help="split names and fractions, e.g. train=0.8,val=0.1,test=0.1 (the default)")
    s.add_argument("--split-by", choices=["photo", "person"], help="split by photo content (default) or by person")
    s.add_argument("--seed", type=int, help="seed of the negatives and of the options' order (default 0)")
    s.add_argument("--negatives", type=int, help="recognition negatives per photo (default 2)")
    s.add_argument("--truth", help="JSON object, photo path -> names of the people in it (default: the face "
                   "matcher's names)")  # fmt: skip
    s.add_argument("--bank", help="root URI of the concept banks the caption runs read (default: the config's)")
    again = s.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="go on with an unfinished build of the same options")
    again.add_argument("--overwrite", action="store_true", help="remove what the folder holds first")
