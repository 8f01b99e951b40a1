"""The commands of an archive's people: ``people suggest|merge|reject`` and ``forget``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from pipelines.cli.common import command, config_of


def cmd_suggest(args: argparse.Namespace) -> int:
    from pipelines.people import suggest

    config = config_of(args)
    summary = suggest(config, args.output, args.user or config.input.user, full=args.full)
    for line in summary.lines():
        print(line)
    print(json.dumps({"clusters": [{"id": c["id"], "size": c["size"]} for c in summary.clusters],
                      **{k: v for k, v in asdict(summary).items() if k != "clusters"}}))  # fmt: skip
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pipelines.people import merge

    config = config_of(args)
    print(merge(config, args.output, args.user or config.input.user, args.cluster, args.into, args.name))
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from pipelines.people import reject

    config = config_of(args)
    print(reject(config, args.output, args.user or config.input.user, args.name, args.photo, args.face, args.cluster))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from pipelines.forget import forget

    summary = forget(config_of(args), args.user, args.name, args.outputs)
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def add(sub) -> None:
    """Declare these commands under ``sub``."""
    people = sub.add_parser("people", help="suggested people: the faces nobody named").add_subparsers(
        dest="what", required=True
    )
    s = command(sub, "suggest", cmd_suggest, "cluster the faces of the user's face index that nobody named into "
                "suggested people (incremental; under the user's bank lease)", under=people)  # fmt: skip
    s.add_argument("output", help="output folder URI whose face index (OUTPUT/_faces, or index.uri) to cluster")
    s.add_argument("--user", help="the user (default: the config's input.user)")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("--full", action="store_true", help="cluster every unnamed face again (ids kept where a cluster "
                   "holds most of an earlier one's faces)")  # fmt: skip
    s = command(sub, "merge", cmd_merge, "merge a cluster into another, or into an enrolled person (--name)",
                under=people)  # fmt: skip
    s.add_argument("output", help="output folder URI")
    s.add_argument("cluster", type=int, help="the cluster merged away")
    s.add_argument("into", type=int, nargs="?", help="the cluster that takes its faces")
    s.add_argument("--name", help="an enrolled person who takes its best faces as match keys")
    s.add_argument("--user", help="the user (default: the config's input.user)")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s = command(sub, "reject", cmd_reject, "these faces are not NAME: no later rematch or caption run names them so",
                under=people)  # fmt: skip
    s.add_argument("output", help="output folder URI")
    s.add_argument("--name", required=True, help="the enrolled person the faces are not")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--photo", help="a photo: its faces named NAME (or --face N)")
    what.add_argument("--cluster", type=int, help="every face of this cluster")
    s.add_argument("--face", type=int, help="with --photo: this face (0 = the photo's first)")
    s.add_argument("--user", help="the user (default: the config's input.user)")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")

    s = command(sub, "forget", cmd_forget, "a privacy request: the person leaves the bank (every version), the "
                "outputs' rows, the face index, the people table and the exports; an audit line stays")  # fmt: skip
    s.add_argument("--user", required=True, help="the user whose bank holds the person")
    s.add_argument("--name", required=True, help="the person's name")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("outputs", nargs="*", help="the output folders of the user's caption runs")
