"""The ``plvm`` command: enroll people, caption photos, evaluate, report.

Exit codes: see ``plvm_model.store.errors.EXIT_CODES`` (and the README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from plvm_model.store.errors import INTERRUPTED, ConfigError, PlvmError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def _config(args: argparse.Namespace, **overrides):
    from pipelines.config import load_config

    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(config_path, bank=getattr(args, "bank", None), **overrides)


def cmd_enroll(args: argparse.Namespace) -> int:
    from pipelines.enroll import Enroller, EnrollError, enroll, read_captions

    if (args.method == "myvlm") != (args.captions is not None):
        raise EnrollError("--captions CAPTIONS.json goes with --method myvlm, and only with it")
    faces = {"face_index": args.face, "face_policy": args.face_policy}
    if args.method == "myvlm":
        captions = read_captions(args.captions)
        result = Enroller(_config(args)).enroll_myvlm(args.user, args.name, args.images, captions, **faces)
    else:
        result = enroll(_config(args), args.user, args.name, args.images, **faces)
    verb = "enrolled" if result.created else "extended" if result.added else "already enrolled from these photos:"
    print(f"{verb} {result.name!r} ({result.method}, {result.concept_id}) for user {result.user_id!r}: "
          f"{result.references} reference photo(s), bank version {result.version} ({result.bank})")  # fmt: skip
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from pipelines.caption import caption

    config = _config(
        args,
        input__uri=args.input,
        input__user=args.user,
        input__allow_empty=args.allow_empty,
        output__uri=args.output,
        generate__engine=args.engine,
    )
    summary = caption(config, resume=args.resume, overwrite=args.overwrite, retry_errors=args.retry_errors,
                      rebuild_index=args.rebuild_index)  # fmt: skip
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def cmd_rematch(args: argparse.Namespace) -> int:
    from pipelines.rematch import rematch

    summary = rematch(_config(args), args.output, user=args.user)
    for line in summary.lines():
        print(line)
    print(json.dumps(asdict(summary)))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from plvm_model.store.ids import new_run_id
    from plvm_model.store.output_table import OutputTable
    from plvm_model.store.output_schema import output_schema
    from plvm_model.store.errors import InputNotFound

    config = _config(args)
    output = OutputTable(args.output, config.storage)
    if not output.fs.exists(output.root):
        raise InputNotFound(f"{args.output} does not exist: nothing to repair")
    run_id = new_run_id()
    with output.lease(run_id, "repair", config.output.lease_expiry_s):
        output.open(output_schema(config.output.face_embeddings))
        removed = output.deduplicate(run_id)
    for row in removed:
        print(f"removed a second row of {row.path} (user {row.user_id}){' with an error' if row.error else ''}: "
              f"run {row.run_id}, {row.part}")  # fmt: skip
    print(f"{args.output}: removed {len(removed)} duplicate row(s); each photo now has one row")
    return 0


def cmd_index_check(args: argparse.Namespace) -> int:
    from plvm_model.store.errors import IndexCorrupt, InputNotFound
    from plvm_model.store.face_index import FaceIndex

    config = _config(args)
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
    from plvm_model.store.ids import new_run_id
    from plvm_model.store.output_table import OutputTable
    from plvm_model.store.errors import InputNotFound
    from plvm_model.store.face_index import FaceIndex

    config = _config(args)
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


def cmd_eval_recognition(args: argparse.Namespace) -> int:
    from pipelines.evaluate import JUDGE_QUESTION, recognition

    config = _config(args)
    if args.threshold is not None:
        key = "relative_threshold" if config.match.normalization == "cohort" else "threshold"
        config = config.model_copy(update={"match": config.match.model_copy(update={key: args.threshold})})
    if args.judge == "model" and (args.cv or args.threshold is not None):
        raise ConfigError("--cv and --threshold set the face matcher's threshold; they need --judge face")
    result = recognition(config, args.directory, args.protocol, args.face_policy, args.judge)
    kind = "distance / cohort scale" if config.match.normalization == "cohort" else "distance"
    judged = f"{kind} <= {result.threshold}" if args.judge == "face" else f"the model's yes or no ({JUDGE_QUESTION})"
    print(f"recognition, {result.protocol} protocol, reference face: {result.face_policy}, {judged}:")
    for skip in result.skipped:
        print(f"  skipped {skip.person}: {skip.reason}")
    print(f"  positive accuracy {result.positive_accuracy:.4f} ({result.n_positive} photos)")
    print(f"  negative accuracy {result.negative_accuracy:.4f} ({result.n_negative} photo-person pairs)")
    print(f"  weighted accuracy {result.weighted_accuracy:.4f}, ROC AUC {result.roc_auc:.4f}")
    if args.cv:
        from pipelines.evaluate import cross_validate

        cv = cross_validate(result)
        print(f"  leave-one-person-out: weighted {cv.weighted_accuracy:.4f} (positive {cv.positive_accuracy:.4f}, "
              f"negative {cv.negative_accuracy:.4f}); thresholds chosen without each person: "
              f"{min(cv.thresholds.values()):.3f}-{max(cv.thresholds.values()):.3f}")  # fmt: skip
    for path in result.no_face:
        print(f"  no face found: {path}")
    for d in result.errors():
        what = "missed" if d.positive else "false match"
        distance = "no face" if d.distance is None else f"distance {d.distance:.3f}"
        print(f"  {what}: {d.person} in {d.photo} ({distance})")
    if args.report:
        from pipelines.report import recognition_report

        print(f"  report: {recognition_report(result, args.report)}")
    print(json.dumps(result.summary()))
    return 0


def cmd_eval_captions(args: argparse.Namespace) -> int:
    from pipelines.caption_eval import evaluate_captions

    result = evaluate_captions(args.output, args.truth, _config(args).storage)

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"captions of {args.output}, {result.photos} photos; who is there: {result.truth}")
    print(f"  recall {share(result.recall)} (photos where a person is that name them), "
          f"false mentions {share(result.false_mention_rate)} (captions naming someone who is not there)")  # fmt: skip
    for name, score in result.people.items():
        print(f"  {name}: recall {share(score.recall)} ({score.named}/{score.present}), "
              f"false mentions {share(score.false_mentions)} ({score.falsely_named}/{score.absent})")  # fmt: skip
    if result.without_caption or result.not_in_truth:
        print(f"  not scored: {result.without_caption} rows without a caption, {result.not_in_truth} not in the truth")
    print(json.dumps(result.summary()))
    return 0


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from pipelines.vqa import vqa

    result = vqa(_config(args, generate__engine=args.engine), args.questions, root=args.root)
    print(f"VQA, {result.n} multiple-choice questions: accuracy {result.accuracy:.4f}")
    for source, (right, asked) in result.by_source.items():
        if asked:
            print(f"  answered by the {source}: {right}/{asked} right")
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(a) + "\n" for a in result.answers))
        print(f"  answers: {args.answers}")
    print(json.dumps(result.summary()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.report import caption_report

    page = caption_report(args.results, args.out, args.limit, _config(args).storage)
    print(f"report: {page}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipelines.report import caption_rows

    table = caption_rows(args.output, _config(args).storage)
    for row in table.slice(0, args.limit).to_pylist():
        names = ", ".join(row["concepts"] or []) or "-"
        text = row["error"] or row["caption"] or ""
        print(f"{row['path']}  [{names}]  {text[:100]}")
    if table.num_rows > args.limit:
        print(f"... {table.num_rows - args.limit} more rows")
    return 0


def add_face_policy(s: argparse.ArgumentParser) -> None:
    s.add_argument("--face-policy", choices=["largest", "centre"], default="largest",
                   help="reference face of a photo with several: largest, one at least twice as large as the others "
                        "(else refused; the default), or centre, the one nearest the photo's centre")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plvm", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable, help: str, under=sub) -> argparse.ArgumentParser:
        s = under.add_parser(name, help=help, description=help)
        s.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name} of this project)")
        s.set_defaults(handler=handler)
        return s

    s = command("enroll", cmd_enroll, "add a named person to a user's concept bank from reference photos")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("--user", required=True, help="the user whose bank gets the concept")
    s.add_argument("--name", required=True, help="the person's name, as captions will say it")
    s.add_argument("--face", type=int, help="which face of a reference photo with several (0 = leftmost)")
    s.add_argument("--method", choices=["plvm", "myvlm"], default="plvm",
                   help="plvm: the Aligner's soft tokens of the first photo, no training (the default); myvlm: a "
                        "concept vector trained on the photos and their --captions (config section myvlm)")  # fmt: skip
    s.add_argument("--captions", help="MyVLM: JSON object, each photo's file name -> its caption naming the person")
    add_face_policy(s)
    s.add_argument("images", nargs="+", help="reference photos (paths or URIs); MyVLM: its 3-5 training photos")

    s = command("caption", cmd_caption, "caption photos with the people of their owner's concept bank")
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
                   help="write again the rows whose error is retryable (see the README); implies --resume")  # fmt: skip
    s.add_argument("--rebuild-index", action="store_true",
                   help="drop the face index's damaged parts first; their photos are detected again")  # fmt: skip

    s = command("repair", cmd_repair, "keep one row per photo in an output that runs wrote twice (under its lease)")
    s.add_argument("output", help="output folder URI")

    s = command("rematch", cmd_rematch, "after a bank changed: name the output's indexed faces again and replace the "
                "rows whose names changed, in one commit (under the output's lease)")  # fmt: skip
    s.add_argument("output", help="output folder URI of caption runs")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("--user", help="only this user's photos (default: every user of the output)")

    index = sub.add_parser("index", help="the face index").add_subparsers(dest="what", required=True)
    s = command("check", cmd_index_check, "read every part of a face index and list the damaged ones", index)
    s.add_argument("output", nargs="?", help="output folder URI whose index (OUTPUT/_faces, or index.uri) to check")
    s.add_argument("--index", help="the index's root URI (default: the config's index.uri, or OUTPUT/_faces)")
    s = command("compact", cmd_index_compact, "merge each user's index parts into one, keeping the current rows "
                "(under the output's lease)", index)  # fmt: skip
    s.add_argument("output", help="output folder URI whose index (OUTPUT/_faces, or index.uri) to compact")
    s.add_argument("--user", help="only this user's parts (default: every user of the index)")

    evaluate = sub.add_parser("eval", help="evaluate recognition, captions or VQA")
    evaluate = evaluate.add_subparsers(dest="what", required=True)
    s = command("recognition", cmd_eval_recognition, "is P in this photo? on a PLVM/YoLLaVA-layout folder", evaluate)
    s.add_argument("directory", help="one folder per person: ref_img.* and that person's photos")
    s.add_argument("--protocol", choices=["single", "bank"], default="single",
                   help="single: each person alone in a bank (as the papers); bank: all in one bank")  # fmt: skip
    s.add_argument("--threshold", type=float,
                   help="match threshold (relative with cohort normalization; default: the config's)")  # fmt: skip
    s.add_argument("--cv", action="store_true",
                   help="also choose the threshold by leave-one-person-out cross-validation")  # fmt: skip
    s.add_argument("--report", help="folder for an HTML report of the errors")
    s.add_argument("--judge", choices=["face", "model"], default="face",
                   help="who answers: the face matcher, or the model asked 'Is <sks> in this photo?' about every "
                   "(person, photo) pair with the person's concept injected (PLVM's protocol)")  # fmt: skip
    add_face_policy(s)

    s = command("captions", cmd_eval_captions, "MyVLM's metric: do the captions name the people in the photos?",
                evaluate)  # fmt: skip
    s.add_argument("output", help="a caption run's output folder URI, or one Parquet file")
    s.add_argument("--truth", help="JSON object, photo path -> names of the people in it "
                   "(default: the recognised ones)")  # fmt: skip

    s = command("vqa", cmd_eval_vqa, "multiple-choice questions about enrolled people, PLVM's JSON format", evaluate)
    s.add_argument("questions", help="JSON list of {ref_img, query_img?, question with <sks>, multiple_choice, "
                   "correct_answer}")  # fmt: skip
    s.add_argument("--root", help="folder the image paths are relative to (default: the file's folder or its parent)")
    s.add_argument("--engine", choices=["transformers", "vllm"], help="generation engine (default: the config's)")
    s.add_argument("--answers", help="write each question's choice, source and model text here (JSON lines)")

    s = command("report", cmd_report, "draw a caption run's photos with their faces, names and captions (HTML + PNG)")
    s.add_argument("results", help="output folder URI, or one Parquet file")
    s.add_argument("--out", required=True, help="folder for index.html, the photos and the contact sheets")
    s.add_argument("--limit", type=int, default=200, help="photos drawn (default 200)")

    s = command("show", cmd_show, "print the rows of a caption run's output: path, named people, caption or error")
    s.add_argument("output", help="output folder URI, or one Parquet file")
    s.add_argument("--limit", type=int, default=20, help="rows to print (default 20)")
    return p


def run(argv: list[str] | None = None) -> int:
    """Run one ``plvm`` command line in this process and return its exit code (``plvm_model.store.errors.EXIT_CODES``).

    A :class:`PlvmError` is printed as one line; anything else (a bug, Ctrl-C) propagates.
    """
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except PlvmError as error:  # the user's to act on: one message; anything else is a bug and keeps its traceback
        print(f"plvm {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``plvm`` program: :func:`run`, then Ray shut down, the output flushed, and the process ended at once.

    The process ends with ``os._exit``, without the interpreter's teardown, in which native thread pools
    still alive (pyarrow's, after reading Parquet: apache/arrow#34314) are destroyed while running and
    abort the process (``terminate called without an active exception``, exit 134) after its work is
    done, now and then. What that teardown would still do is done here first: Ray shut down (the Ray
    this process started stops with it), logs and standard streams flushed. A bug prints its traceback
    and exits 1; argparse's usage errors exit 2; Ctrl-C exits :data:`INTERRUPTED`.
    """
    try:
        code = run(argv)
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except KeyboardInterrupt:
        print("plvm: interrupted", file=sys.stderr)
        code = INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: its traceback, as the interpreter would print it
        traceback.print_exc()
        code = 1
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
