"""``plvm enroll``: a person added to a user's bank."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_face_policy, command, config_of


def cmd_enroll(args: argparse.Namespace) -> int:
    from pipelines.enroll import Enroller, EnrollError, enroll, read_captions
    from plvm_model.random_weights import mode_line

    if (args.method == "myvlm") != (args.captions is not None):
        raise EnrollError("--captions CAPTIONS.json goes with --method myvlm, and only with it")
    faces = {"face_index": args.face, "face_policy": args.face_policy}
    config = config_of(args)
    if (args.from_cluster is None) == (not args.images) or (args.from_cluster is not None) != bool(args.output):
        raise EnrollError("give reference photos, or --from-cluster ID with --output OUTPUT (one of them)")
    if args.from_cluster is not None:
        if args.method != "plvm":
            raise EnrollError("--from-cluster enrolls a PLVM concept (--method plvm)")
        result = Enroller(config).enroll_cluster(args.user, args.name, args.output, args.from_cluster)
    elif args.method == "myvlm":
        captions = read_captions(args.captions)
        result = Enroller(config).enroll_myvlm(args.user, args.name, args.images, captions, **faces)
    else:
        result = enroll(config, args.user, args.name, args.images, **faces)
    verb = "enrolled" if result.created else "extended" if result.added else "already enrolled from these photos:"
    print(f"{verb} {result.name!r} ({result.method}, {result.concept_id}) for user {result.user_id!r}: "
          f"{result.references} reference photo(s), bank version {result.version} ({result.bank})")  # fmt: skip
    print(mode_line(config.models.random_weights))
    return 0


def add(sub) -> None:
    """Declare these commands under ``sub``."""
    s = command(sub, "enroll", cmd_enroll, "add a named person to a user's concept bank from reference photos")
    s.add_argument("--bank", help="root URI of the concept banks (default: the config's bank)")
    s.add_argument("--user", required=True, help="the user whose bank gets the concept")
    s.add_argument("--name", required=True, help="the person's name, as captions will say it")
    s.add_argument("--face", type=int, help="which face of a reference photo with several (0 = leftmost)")
    s.add_argument("--method", choices=["plvm", "myvlm"], default="plvm",
                   help="plvm: the Aligner's soft tokens of the first photo, no training (the default); myvlm: a "
                        "concept vector trained on the photos and their --captions (config section myvlm)")  # fmt: skip
    s.add_argument("--captions", help="MyVLM: JSON object, each photo's file name -> its caption naming the person")
    s.add_argument("--from-cluster", type=int, help="enroll from this suggested person of --output (plvm people "
                   "suggest): its best face's photo is the reference, its best faces the match keys")  # fmt: skip
    s.add_argument("--output", help="with --from-cluster: the output folder whose people table holds the cluster")
    add_face_policy(s)
    s.add_argument("images", nargs="*", help="reference photos (paths or URIs); MyVLM: its 3-5 training photos")
