"""Suggested people: how well the clusters match known identities, what a multi-face key does to recall, and what
an incremental run costs against a full recluster.

    PYTHONPATH=. .venv/bin/python benchmarks/people.py quality [--set NAME=DIR ...] [--work DIR]
    PYTHONPATH=. .venv/bin/python benchmarks/people.py scale [--faces N ...]

**quality**: for each set in the PLVM/YoLLaVA layout (one folder per person), every photo goes through the
pipeline's face stages (read, decode, detect, align, embed, on Ray) into a face index of one user (built once
into ``--work``, then reused), and the real ``plvm people suggest`` code clusters its faces
(``pipelines.people.recluster``, full), at the configured thresholds and at other settings. A face's true identity:
in a person's folder, the face of a photo with one face, or the reference face (the largest), or in a photo with
several faces the one nearest the person's reference face if it is within 0.6; the other faces stay unlabelled (they
are clustered, as an archive's strangers are, but not scored). Printed per setting: pairwise precision and recall
of the clusters over the labelled faces that pass the size and score limits (a pair is together when both faces
are in one cluster), the share of those faces left unclustered, the clusters, and the same for an incremental
run (the first half of each person's photos clustered, then the second half added by the incremental pass). Then,
per number of match keys (1, 3, 5), what enrolling a person from a cluster of the first half of their faces does to
naming the second half: recall of their faces and false matches of everyone else's, with cohort normalisation over
the set's faces (the match stage's rule, each person alone in a bank).

**scale**: a synthetic face index of N faces of one user (identities of 5-40 faces, 128-d, one person's faces
within about 0.4 of each other, and strangers), with the 5 sample people enrolled as the user's bank (every run
names the index's faces against it before clustering), clustered once (full); then 10 new photos (20 faces) are indexed
and clustered by an incremental run and, for comparison, by a full recluster; each in a fresh process, with its
wall time and its peak RSS (the driver: suggest runs in the calling process, no Ray).

The DBSCAN baseline of **quality** needs scikit-learn, which the project's environment leaves out:
``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Recorder, add_results_option, header, peak_rss  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from pipelines.people import indexed_faces, recluster  # noqa: E402
from plvm_model.faces import clustering  # noqa: E402
from plvm_model.faces.matching import cohort_scale, distance_matrix  # noqa: E402
from plvm_model.store.face_index import SCHEMA, FaceIndex, content_hash  # noqa: E402
from plvm_model.store.people import UNCLUSTERED, People  # noqa: E402

USER = "bench"
SAMPLE = REPO.parent / "shared" / "data" / "yollava-humans"
HELD_OUT = REPO.parent / "data-plvm" / "validation_recognition"
SAMPLE_PEOPLE = ("phuc-map", "thao", "thuytien", "viruss", "willinvietnam")
NIGHTLY = 10
"""Photos a night in the incremental rows."""
THRESHOLDS = (0.44, 0.42, 0.46)
"""The configured threshold (``people.threshold``) first, then two others compared."""
SPACE = "dlib-resnet-v1"


def build_index(config: Config, folder: Path, skip: tuple[str, ...]) -> None:
    """The face index of every photo of ``folder``'s people (but ``skip``), as one user's, into config's output."""
    from operators.read import IMAGE_EXTENSIONS
    from pipelines.evaluation.stages import face_table

    paths = sorted(str(p) for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.parent.name not in skip)  # fmt: skip
    rows = []
    for row in face_table(config, paths).to_pylist():
        if row["error"]:
            print(f"- left out {row['path']}: {row['error']}")
            continue
        faces = [{"box": f["box"], "score": f["score"], "landmarks": f["landmarks"], "descriptor": f["embedding"]}
                 for f in row["faces"]]  # fmt: skip
        rows.append({"content_hash": content_hash(Path(row["path"]).read_bytes()), "path": row["path"],
                     "width": row["width"], "height": row["height"], "faces": faces,
                     "indexed_at": datetime.now(UTC), "run_id": "benchmark"})  # fmt: skip
    index = FaceIndex(config.index.root(config.output.uri))
    index.write(USER, "benchmark-0", pa.Table.from_pylist(rows, SCHEMA), SPACE)


def labels(faces) -> list[str | None]:
    """Each face's true identity (see the module), or None."""
    by_photo: dict[str, list[int]] = {}
    for i, path in enumerate(faces.paths):
        by_photo.setdefault(path, []).append(i)
    out: list[str | None] = [None] * len(faces.keys)
    refs = {}
    for path, members in by_photo.items():
        if Path(path).stem == "ref_img":
            areas = [np.prod(faces.boxes[i, 2:] - faces.boxes[i, :2]) for i in members]
            refs[Path(path).parent.name] = members[int(np.argmax(areas))]
    for path, members in by_photo.items():
        person = Path(path).parent.name
        if len(members) == 1:
            out[members[0]] = person
        elif person in refs:
            d = np.linalg.norm(faces.vectors[members] - faces.vectors[refs[person]], axis=1)
            if Path(path).stem == "ref_img":
                out[refs[person]] = person
            elif d.min() <= 0.6:
                out[members[int(d.argmin())]] = person
    return out


def pairwise(assigned: dict[int, int], truth: list[str | None], scored: list[int]) -> tuple[float, float]:
    """Pairwise precision and recall of cluster ids ``assigned`` (face -> id; absent: unclustered) over ``scored``."""
    together = same = both = 0
    for i, j in itertools.combinations(scored, 2):
        joint = i in assigned and assigned.get(i) == assigned.get(j)
        alike = truth[i] == truth[j]
        together += joint
        same += alike
        both += joint and alike
    return (both / together if together else 1.0), (both / same if same else 1.0)


def assignment(people: People, faces) -> dict[int, int]:
    at = faces.at()
    return {at[k]: c.cluster_id for c in people.clusters.values() if c.cluster_id != UNCLUSTERED for k in c.faces}


def with_settings(config: Config, threshold: float) -> Config:
    people = config.people.model_copy(update={"threshold": threshold, "join_threshold": threshold - 0.02})
    return config.model_copy(update={"people": people})


def subset(faces, keep: list[bool]):
    """The faces where ``keep`` is true."""
    from pipelines.people import IndexedFaces

    at = [i for i, k in enumerate(keep) if k]
    return IndexedFaces([faces.keys[i] for i in at], faces.vectors[at], [faces.paths[i] for i in at],
                        faces.boxes[at], faces.scores[at], [faces.concepts[i] for i in at], faces.rows)  # fmt: skip


def quality_rows(name: str, config: Config, faces, truth: list[str | None]) -> None:
    """The table of one group of people (see the module)."""
    from sklearn.cluster import DBSCAN

    from pipelines.people import candidates

    pool = set(candidates(config, faces).tolist())
    scored = [i for i in range(len(truth)) if truth[i] is not None and i in pool]
    filtered = sum(1 for i in range(len(truth)) if truth[i] is not None and i not in pool)
    print(f"\n**{name}**: {len(faces.keys)} faces in {len(set(faces.paths))} photos, {len(scored)} labelled faces of "
          f"{len({truth[i] for i in scored})} people scored ({filtered} labelled faces under the size or score limits "
          "left out)\n")  # fmt: skip
    print("| clustering | run | pairwise precision | pairwise recall | unclustered | clusters |")
    print("|---|---|---|---|---|---|")
    photos = sorted(set(faces.paths))
    first = {p: sorted(q for q in photos if Path(q).parent == Path(p).parent).index(p) % 2 == 0 for p in photos}
    for threshold in THRESHOLDS:
        settings = with_settings(config, threshold)
        label = f"whispers {threshold}" + (" (configured)" if threshold == config.people.threshold else "")
        people = People(USER, SPACE)
        recluster(settings, people, faces, full=True)
        row(label, "full", assignment(people, faces), truth, scored)
        people = People(USER, SPACE)
        recluster(settings, people, subset(faces, [first[p] for p in faces.paths]), full=True)
        recluster(settings, people, faces, full=False)
        row(label, "half, then the rest incremental", assignment(people, faces), truth, scored)
        people = People(USER, SPACE)
        recluster(settings, people, subset(faces, [first[p] for p in faces.paths]), full=True)
        later = [p for p in photos if not first[p]]
        for end in range(NIGHTLY, len(later) + NIGHTLY, NIGHTLY):
            seen = set(later[:end])
            recluster(settings, people, subset(faces, [first[p] or p in seen for p in faces.paths]), full=False)
        row(label, f"half, then the rest {NIGHTLY} photos a night", assignment(people, faces), truth, scored)
    candidates_ = sorted(pool)
    found = DBSCAN(eps=0.42, min_samples=3).fit_predict(faces.vectors[candidates_])
    assigned = {i: int(label) for i, label in zip(candidates_, found) if label >= 0}
    row("DBSCAN eps 0.42, min_samples 3 (scikit-learn)", "full", assigned, truth, scored)
    keys_rows(config, faces, truth, first)


def row(label: str, run: str, assigned: dict[int, int], truth, scored: list[int]) -> None:
    precision, recall = pairwise(assigned, truth, scored)
    unclustered = sum(i not in assigned for i in scored) / len(scored)
    clusters = len(set(assigned.values()))
    print(f"| {label} | {run} | {precision:.3f} | {recall:.3f} | {unclustered:.3f} | {clusters} |")


def keys_rows(config: Config, faces, truth: list[str | None], halves: dict[str, bool]) -> None:
    """Recall and false matches of a person enrolled from the first half of their faces with 1, 3 or 5 keys."""
    rule = config.match.rule()
    people = sorted({t for t in truth if t})
    print("\n| match keys | people | recall of their second-half faces | false matches of others' faces |")
    print("|---|---|---|---|")
    quality = np.asarray([clustering.face_quality(b, s, config.people.good_face_px)
                          for b, s in zip(faces.boxes, faces.scores)])  # fmt: skip
    for count in (1, 3, 5):
        hits = positives = false = negatives = enrolled = 0
        for person in people:
            first = [i for i, t in enumerate(truth) if t == person and halves[faces.paths[i]]]
            second = [i for i, t in enumerate(truth) if t == person and not halves[faces.paths[i]]]
            if len(first) < 2 or not second:
                continue
            enrolled += 1
            vectors = faces.vectors[first]
            best = clustering.representative(vectors, quality[first])
            refs = vectors[clustering.keys(vectors, quality[first], best, count)]
            others = [i for i in range(len(truth)) if truth[i] != person]
            cohort = faces.vectors[[i for i in range(len(truth)) if i not in first]]
            scale = cohort_scale(refs, cohort, rule.cohort_min_distance, rule.cohort_fraction)
            scores = rule.scores(distance_matrix(faces.vectors, [refs]), [scale])[:, 0]
            named = scores <= rule.limit
            hits += int(named[second].sum())
            positives += len(second)
            false += int(named[others].sum())
            negatives += len(others)
        print(f"| {count} | {enrolled} | {hits / positives:.3f} ({hits}/{positives}) | "
              f"{false / negatives:.4f} ({false}/{negatives}) |")  # fmt: skip


def quality(args) -> None:
    print(header("Suggested people: cluster quality (`benchmarks/people.py quality`)"))
    print(f"- command: `{' '.join(['benchmarks/people.py', *sys.argv[1:]])}`; the held-out set: {args.held_out}")
    config = load_config(args.config)
    print(f"- configured: people.threshold {config.people.threshold}, min_size {config.people.min_size}, "
          f"join_threshold {config.people.join_threshold}, min_face_px {config.people.min_face_px}, min_score "
          f"{config.people.min_score}; the thresholds were chosen on the sample people and on half A of the held-out "
          "people (the even ones in name order); half B (the odd ones) was never tuned on")  # fmt: skip
    for folder, skip in ((Path(args.sample), ()), (Path(args.held_out), SAMPLE_PEOPLE)):
        work = Path(args.work) / folder.name
        conf = load_config(args.config, bank=str(work / "banks"), output__uri=str(work / "out"))
        if not FaceIndex(conf.index.root(conf.output.uri)).parts(USER):
            build_index(conf, folder, skip)
        faces = indexed_faces(conf, conf.output.uri, USER, bank_version=0)
        truth = labels(faces)
        if skip:
            people = sorted({Path(p).parent.name for p in faces.paths})
            halves = {"A": set(people[0::2]), "B": set(people[1::2])}
            for half, name in (("B", "never tuned on"), ("A", "tuned on")):
                keep = [Path(p).parent.name in halves[half] for p in faces.paths]
                part = subset(faces, keep)
                quality_rows(f"PLVM validation_recognition, half {half} ({name})", conf, part,
                             [t for t, k in zip(truth, keep) if k])  # fmt: skip
        else:
            quality_rows("the sample people (tuned on)", conf, faces, truth)


def synthetic(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` faces: identities of 5-40 faces (a centre on the sphere of radius 0.6, faces within about 0.4) and one
    face in five a stranger."""
    out = []
    while len(out) < n:
        if rng.random() < 0.2:
            out.append(rng.normal(0, 1, 128) * 0.6 / np.sqrt(128) * 1.2)
            continue
        centre = rng.normal(0, 1, 128)
        centre *= 0.6 / np.linalg.norm(centre)
        out.extend(centre + rng.normal(0, 0.018, (rng.integers(5, 41), 128)))
    return np.asarray(out[:n], np.float32)


def write_part(config: Config, name: str, vectors: np.ndarray, start: int) -> None:
    face = {"box": [0.0, 0.0, 150.0, 150.0], "score": 0.999, "landmarks": [[1.0, 1.0]] * 5}
    rows = [{"content_hash": f"{start + i // 2:064x}", "path": f"/archive/{start + i // 2}.jpg", "width": 600,
             "height": 600, "faces": [{**face, "descriptor": v} for v in vectors[i : i + 2]],
             "indexed_at": datetime.now(UTC), "run_id": name} for i in range(0, len(vectors), 2)]  # fmt: skip
    FaceIndex(config.index.root(config.output.uri)).write(USER, name, pa.Table.from_pylist(rows, SCHEMA), SPACE)


def step(args) -> None:
    """One timed step in this fresh process: ``plvm people suggest`` (incremental or ``--full``)."""
    from pipelines.people import suggest

    work = Path(args.work)
    config = load_config(args.config, bank=str(work / "banks"), output__uri=str(work / "out"))
    started = time.perf_counter()
    summary = suggest(config, config.output.uri, USER, full=args.step == "full")
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_kib": peak_rss() // 1024,
                      "new": summary.new_faces, "clusters": len(summary.clusters)}))  # fmt: skip


def enroll_sample(config: Config) -> None:
    """The sample people enrolled as the user's bank (every run names the index's faces against it first)."""
    from pipelines.enroll import Enroller

    enroller = Enroller(config)
    for ref in sorted(SAMPLE.glob("*/ref_img.jpg")):
        enroller.enroll(USER, ref.parent.name, [str(ref)])


def scale(args) -> None:
    print(header("Suggested people: an incremental run against a full recluster (`benchmarks/people.py scale`)"))
    print(f"- command: `{' '.join(['benchmarks/people.py', *sys.argv[1:]])}`")
    print("\n| indexed faces | step | seconds | driver peak RSS, MiB | faces looked at | open clusters |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in args.faces:
        with tempfile.TemporaryDirectory() as work:
            config = load_config(args.config, bank=str(Path(work) / "banks"), output__uri=str(Path(work) / "out"))
            enroll_sample(config)
            vectors = synthetic(n + 20, rng)
            write_part(config, "synthetic-archive", vectors[:n], 0)

            def run(what: str) -> dict:
                command = [sys.executable, __file__, "step", "--step", what, "--work", work, "--config", args.config]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                return json.loads(out.strip().splitlines()[-1])

            first = run("full")
            print(f"| {n} | first run (full) | {first['seconds']:.2f} | {first['peak_kib'] / 1024:.0f} | "
                  f"{first['new']} | {first['clusters']} |")  # fmt: skip
            write_part(config, "synthetic-nightly", vectors[n:], n)
            for what, label in (("incremental", "nightly: 10 photos, incremental"),
                                ("full", "nightly: full recluster")):  # fmt: skip
                got = run(what)
                print(f"| {n + 20} | {label} | {got['seconds']:.2f} | {got['peak_kib'] / 1024:.0f} | {got['new']} | "
                      f"{got['clusters']} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quality", "scale", "step"])
    parser.add_argument("--sample", default=str(SAMPLE), help="the tuning set (PLVM/YoLLaVA layout)")
    parser.add_argument("--held-out", default=str(HELD_OUT),
                        help="PLVM's validation_recognition folder (its sample people are left out)")  # fmt: skip
    parser.add_argument("--work", default=str(REPO / ".cache" / "plvm" / "people-benchmark"),
                        help="where the sets' face indexes are built once")  # fmt: skip
    parser.add_argument("--faces", type=int, nargs="+", default=[200, 20000])
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.what == "step":
        return step(args)
    record = Recorder(f"people.py {args.what}", args.results)
    quality(args) if args.what == "quality" else scale(args)
    record.write()


if __name__ == "__main__":
    main()
