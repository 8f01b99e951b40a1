"""``plvm eval``: recognition, captions, VQA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli.common import add_face_policy, command, config_of
from plvm_model.random_weights import mode_line
from plvm_model.store.errors import ConfigError


def cmd_eval_recognition(args: argparse.Namespace) -> int:
    from pipelines.evaluation.recognition import JUDGE_QUESTION, recognition

    config = config_of(args)
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
        from pipelines.evaluation.recognition import cross_validate

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
    print(f"  {mode_line(config.models.random_weights)}")
    print(json.dumps(result.summary() | {"random_weights": config.models.random_weights}))
    return 0


def cmd_eval_captions(args: argparse.Namespace) -> int:
    from pipelines.evaluation.captions import evaluate_captions

    result = evaluate_captions(args.output, args.truth, config_of(args).storage)

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
    from pipelines.evaluation.vqa import vqa

    config = config_of(args, generate__engine=args.engine)
    result = vqa(config, args.questions, root=args.root)
    print(f"VQA, {result.n} multiple-choice questions: accuracy {result.accuracy:.4f}")
    for source, (right, asked) in result.by_source.items():
        if asked:
            print(f"  answered by the {source}: {right}/{asked} right")
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(a) + "\n" for a in result.answers))
        print(f"  answers: {args.answers}")
    print(f"  {mode_line(config.models.random_weights)}")
    print(json.dumps(result.summary() | {"random_weights": config.models.random_weights}))
    return 0


def add(sub) -> None:
    """Declare these commands under ``sub``."""
    evaluate = sub.add_parser("eval", help="evaluate recognition, captions or VQA")
    evaluate = evaluate.add_subparsers(dest="what", required=True)
    s = command(
        sub, "recognition", cmd_eval_recognition, "is P in this photo? on a PLVM/YoLLaVA-layout folder", under=evaluate
    )
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

    s = command(sub, "captions", cmd_eval_captions, "MyVLM's metric: do the captions name the people in the photos?",
                under=evaluate)  # fmt: skip
    s.add_argument("output", help="a caption run's output folder URI, or one Parquet file")
    s.add_argument("--truth", help="JSON object, photo path -> names of the people in it "
                   "(default: the recognised ones)")  # fmt: skip

    s = command(
        sub, "vqa", cmd_eval_vqa, "multiple-choice questions about enrolled people, PLVM's JSON format", under=evaluate
    )
    s.add_argument("questions", help="JSON list of {ref_img, query_img?, question with <sks>, multiple_choice, "
                   "correct_answer}")  # fmt: skip
    s.add_argument("--root", help="folder the image paths are relative to (default: the file's folder or its parent)")
    s.add_argument("--engine", choices=["transformers", "vllm"], help="generation engine (default: the config's)")
    s.add_argument("--answers", help="write each question's choice, source and model text here (JSON lines)")
