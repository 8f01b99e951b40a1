"""The commands of an archive's output: ``caption``, ``rematch``, ``repair``, ``index check|compact``, ``show``,
``report``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from pipelines.cli.common import command, config_of


def cmd_caption(args: argparse.Namespace) -> int:
    from pipelines.caption import caption

    config = config_of(
        args,
        input__uri=args.input,
        input__user=args.user,
        input__allow_empty=args.allow_empty,
        output__uri=args.output,
        generate__engine=args.engine,
        run__metrics_push=args.metrics_push,
    )
    summary = caption(config, resume=args.resume, overwrite=args.overwrite, retry_errors=args.retry_errors,
                      rebuild_index=args.rebuild_index)  # fmt: skip
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def cmd_rematch(args: argparse.Namespace) -> int:
    from pipelines.rematch import rematch

    summary = rematch(config_of(args, run__metrics_push=args.metrics_push), args.output, user=args.user)
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from plvm_model.store.errors import InputNotFound
    from plvm_model.store.ids import new_run_id
    from plvm_model.store.output_schema import output_schema
    from plvm_model.store.output_table import OutputTable

    config = config_of(args)
    output = OutputTable(args.output, config.storage)
    if not output.fs.exists(output.root):
        raise InputNotFound(f"{args.output} does not exist: nothing to repair")
    run_id = new_run_id()
    with output.lease(run_id, "repair", config.output.lease_expiry_s):
        output.prepare(output_schema(config.output.face_embeddings))
        removed = output.deduplicate(run_id)
    for row in removed:
        print(f"removed a second row of {row.path} (user {row.user_id}){' with an error' if row.error else ''}: "
              f"run {row.run_id}, {row.part}")  # fmt: skip
    print(f"{args.output}: removed {len(removed)} duplicate row(s); each photo now has one row")
    return 0


def cmd_index_check(args: argparse.Namespace) -> int:
    from plvm_model.store.errors import IndexCorrupt, InputNotFound
    from plvm_model.store.face_index import FaceIndex

    config = config_of(args)
    root = args.index or config.index.uri or (config.index.root(args.output) if args.output else None)
    if root is None:
        raise InputNotFound("plvm index check needs an OUTPUT (whose index is OUTPUT/_faces) or --index URI")
    index = FaceIndex(root, config.storage)
    users = index.users()
    if not users:
        raise InputNotFound(f"{root} holds no face index")
    bad = index.check()
    for part in bad:
        print(f"damaged: {part.reason}")
    parts = sum(len(index.parts(user)) for user in users)
    if bad:
        raise IndexCorrupt(f"{root}: {len(bad)} of {parts} parts are damaged (listed above); plvm caption "
                           "--rebuild-index drops them and detects their photos again")  # fmt: skip
    print(f"{root}: {len(users)} user(s), {parts} part(s), none damaged")
    return 0


def cmd_index_compact(args: argparse.Namespace) -> int:
    from plvm_model.store.errors import InputNotFound
    from plvm_model.store.face_index import FaceIndex
    from plvm_model.store.ids import new_run_id
    from plvm_model.store.output_table import OutputTable

    config = config_of(args)
    output = OutputTable(args.output, config.storage)
    index = FaceIndex(config.index.root(args.output), config.storage)
    users = [args.user] if args.user else index.users()
    if not output.fs.exists(output.root) or not any(index.parts(user) for user in users):
        raise InputNotFound(f"{index.uri} holds no face index parts{f' of user {args.user}' if args.user else ''}")
    run_id = new_run_id()
    with output.lease(run_id, "index compact", config.output.lease_expiry_s):
        for user in users:
            done = index.compact(user, run_id)
            print(f"user {user}: {done.parts_before} part(s) -> {done.parts_after}, {done.rows} photos' rows kept, "
                  f"{done.superseded} superseded rows dropped")  # fmt: skip
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipelines.report import caption_rows
    from plvm_model import random_weights as randomly
    from plvm_model.store.output_table import OutputTable

    storage = config_of(args).storage
    table = caption_rows(args.output, storage)
    marked = sum(randomly.MARK in (model or "") for model in table.column("model").to_pylist())
    if marked or OutputTable(args.output, storage).holds_random_weights():
        print(f"RANDOM WEIGHTS: {marked} of {table.num_rows} rows were written by models with random weights "
              "(models.random_weights): their captions and answers are noise")  # fmt: skip
    for row in table.slice(0, args.limit).to_pylist():
        names = ", ".join(row["concepts"] or []) or "-"
        text = row["error"] or row["caption"] or ""
        print(f"{row['path']}  [{names}]  {text[:100]}")
    if table.num_rows > args.limit:
        print(f"... {table.num_rows - args.limit} more rows")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.report import caption_report, people_page
    from plvm_model.faces import embedder_class
    from plvm_model.store import exports, storage
    from plvm_model.store.face_index import FaceIndex
    from plvm_model.store.output_table import caption_rows
    from plvm_model.store.people import PeopleStore

    config = config_of(args)
    users = sorted({u for u in caption_rows(args.results, config.storage).column("user_id").to_pylist() if u})
    fs, root = storage.filesystem(args.results, config.storage)
    folder = fs.isdir(root)
    if folder:  # recorded before it is written: plvm forget finds it even if the report stops half-way
        exports.record(args.results, config.storage, "report", str(Path(args.out).resolve()), users)
    pages = []
    space = embedder_class(config.embed.kind).space
    for user in users if folder else []:
        people = PeopleStore(config.people.root(args.results), config.storage).load(user, space)
        if people.suggestions():
            index = FaceIndex(config.index.root(args.results), config.storage).read(user, space)
            pages.append((user, people_page(user, people, index, args.out, config.storage)))
    page = caption_report(args.results, args.out, args.limit, config.storage, pages)
    print(f"report: {page}")
    for user, people_page_path in pages:
        print(f"people of {user}: {people_page_path}")
    return 0


def add_metrics_push(s: argparse.ArgumentParser) -> None:
    s.add_argument("--metrics-push", metavar="URL", help="push the run's metrics (also written to "
                   "OUTPUT/_runs/<run>.prom) to this Prometheus Pushgateway (run.metrics_push)")  # fmt: skip


def add(sub) -> None:
    """Declare these commands under ``sub``."""
    s = command(sub, "caption", cmd_caption, "caption photos with the people of their owner's concept bank")
    s.add_argument("--input", help="folder, glob or Parquet/CSV manifest (path, user_id)")
    s.add_argument("--bank", help="root URI of the concept banks")
    s.add_argument("--output", help="output folder URI for the Parquet files")
    s.add_argument("--user", help="user of a folder's or glob's photos (default: the config's, 'default')")
    s.add_argument("--engine", choices=["transformers", "vllm"], help="generation engine (default: the config's)")
    s.add_argument("--allow-empty", action="store_true", default=None,
                   help="an input that lists no photo is a run of 0 rows, not an error "
                   "(input.allow_empty)")  # fmt: skip
    again = s.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip photos that earlier runs already wrote")
    again.add_argument("--overwrite", action="store_true", help="remove earlier runs' output first")
    s.add_argument("--retry-errors", action="store_true",
                   help="write again the rows whose error is retryable (see docs/output.md); implies --resume")  # fmt: skip
    s.add_argument("--rebuild-index", action="store_true",
                   help="drop the face index's damaged parts first; their photos are detected again")  # fmt: skip
    add_metrics_push(s)

    s = command(
        sub, "repair", cmd_repair, "keep one row per photo in an output that runs wrote twice (under its lease)"
    )
    s.add_argument("output", help="output folder URI")

    s = command(sub, "rematch", cmd_rematch, "after a bank changed: name the output's indexed faces again and replace the "
                "rows whose names changed, in one commit (under the output's lease)")  # fmt: skip
    s.add_argument("output", help="output folder URI of caption runs")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("--user", help="only this user's photos (default: every user of the output)")
    add_metrics_push(s)

    index = sub.add_parser("index", help="the face index").add_subparsers(dest="what", required=True)
    s = command(sub, "check", cmd_index_check, "read every part of a face index and list the damaged ones", under=index)
    s.add_argument("output", nargs="?", help="output folder URI whose index (OUTPUT/_faces, or index.uri) to check")
    s.add_argument("--index", help="the index's root URI (default: the config's index.uri, or OUTPUT/_faces)")
    s = command(sub, "compact", cmd_index_compact, "merge each user's index parts into one, keeping the current rows "
                "(under the output's lease)", under=index)  # fmt: skip
    s.add_argument("output", help="output folder URI whose index (OUTPUT/_faces, or index.uri) to compact")
    s.add_argument("--user", help="only this user's parts (default: every user of the index)")

    s = command(
        sub, "report", cmd_report, "draw a caption run's photos with their faces, names and captions (HTML + PNG)"
    )
    s.add_argument("results", help="output folder URI, or one Parquet file")
    s.add_argument("--out", required=True, help="folder for index.html, the photos and the contact sheets")
    s.add_argument("--limit", type=int, default=200, help="photos drawn (default 200)")

    s = command(sub, "show", cmd_show, "print the rows of a caption run's output: path, named people, caption or error")
    s.add_argument("output", help="output folder URI, or one Parquet file")
    s.add_argument("--limit", type=int, default=20, help="rows to print (default 20)")
