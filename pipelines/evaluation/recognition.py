"""Evaluation of recognition ("is P in this photo?") through the caption pipeline's own operators.

The data set is in the PLVM/YoLLaVA layout: one folder per person with ``ref_img.*`` (the
only reference) and that person's photos. Each person is enrolled by the real enrollment
code, the photos go through the Ray pipeline's read, decode, detect, align and embed stages, and
the match operator names their faces.

``single`` (as in the papers): each person P alone in a bank; P's photos are positives,
every other person's photos negatives. ``bank``: everyone in one bank, each face
identified among them; the same positives and negatives.

The judge of "is P in this photo?" is the face matcher (``face``, the default), or the
model (``model``, PLVM's own protocol): for every (person, photo) pair P's concept is
injected whatever the faces say, the engine is asked "Is <sks> in this photo?" and its
yes or no is the answer.

A person whose reference photo cannot be enrolled (unreadable, no face, or several faces and
none chosen by the face policy) is skipped: nobody is enrolled in their place, their photos
stay negatives for the enrolled people, and the result lists them with the reason.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import mannwhitneyu

from operators.read import IMAGE_EXTENSIONS
from pipelines.evaluation.stages import Question, ask, face_table, match_as
from pipelines.config import Config
from pipelines.enroll import Enroller, EnrollError, FacePolicy
from plvm_model.concept_token import CONCEPT_TOKEN
from plvm_model.faces.matching import MatchRule, distance_matrix
from plvm_model.store.banks import Concept
from plvm_model.store.errors import ConfigError, InputError, InputNotFound

Protocol = Literal["single", "bank"]
Judge = Literal["face", "model"]
JUDGE_QUESTION = f"Is {CONCEPT_TOKEN} in this photo?"
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@dataclass
class Person:
    name: str
    reference: str
    photos: list[str]


@dataclass
class Skipped:
    """A person left out of the evaluation because their reference could not be enrolled."""

    person: str
    reason: str


@dataclass
class Decision:
    person: str
    photo: str
    positive: bool
    predicted: bool
    distance: float | None
    """The smallest distance between the person's concept and a face of the photo."""
    score: float | None = None
    """That distance as the match stage compared it: divided by the concept's cohort scale, if any."""
    faces: list[dict] = field(default_factory=list, repr=False)
    """The photo's faces: box, the concept the match stage gave it, the distance to this person."""
    width: int = 0
    height: int = 0
    answer: str | None = None
    """The model's answer (``judge: model``)."""


@dataclass
class RecognitionResult:
    protocol: str
    positive_accuracy: float
    negative_accuracy: float
    weighted_accuracy: float
    n_positive: int
    n_negative: int
    roc_auc: float
    threshold: float
    face_policy: str = "largest"
    judge: str = "face"
    no_face: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def errors(self) -> list[Decision]:
        return [d for d in self.decisions if d.positive != d.predicted]

    def summary(self) -> dict:
        """The figures (the last line ``plvm eval recognition`` prints)."""
        out = {k: v for k, v in asdict(self).items() if k != "decisions"}
        out["errors"] = len(self.errors())
        return out


def people_of(directory: str | Path) -> list[Person]:
    """The persons of a PLVM/YoLLaVA-layout folder, sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise InputNotFound(f"evaluation folder {root} does not exist")
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        refs = [p for p in images if p.stem == "ref_img"]
        if not refs:
            raise InputError(f"{folder} has no ref_img.* reference photo")
        photos = [str(p) for p in images if p.stem != "ref_img"]
        people.append(Person(folder.name, str(refs[0]), photos))
    if len(people) < 2:
        raise InputError(f"{root} needs at least two person folders, found {len(people)}")
    return people


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney U / (n_pos * n_neg)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    u = mannwhitneyu(positive, negative, alternative="two-sided", method="asymptotic").statistic
    return float(u / (len(positive) * len(negative)))


def says_yes(answer: str) -> bool:
    """Whether the model's answer is yes: its first "yes" or "no" is "yes" (neither: no)."""
    found = _YES_NO.search(answer)
    return found is not None and found.group(1).lower() == "yes"


def model_decisions(config: Config, people: dict[str, Concept], photos: dict[str, str]) -> list[Decision]:
    """PLVM's protocol: each person's concept injected into every photo, the model asked whether they are in it."""
    style = config.generate.concept_style
    questions = [
        Question(path, concept, JUDGE_QUESTION if style == "plvm" else JUDGE_QUESTION.replace(CONCEPT_TOKEN, name))
        for path in photos for name, concept in people.items()
    ]  # fmt: skip
    answers = ask(config, questions)
    for answer in answers:
        if answer.error is not None:
            raise InputError(answer.error)
    return [
        Decision(person=q.concept.name, photo=q.photo, positive=photos[q.photo] == q.concept.name,
                 predicted=says_yes(a.text), distance=None, score=0.0 if says_yes(a.text) else 1.0, width=a.width,
                 height=a.height, answer=a.text)
        for q, a in zip(questions, answers)
    ]  # fmt: skip


def recognition(
    config: Config,
    directory: str | Path,
    protocol: Protocol = "single",
    face_policy: FacePolicy = "largest",
    judge: Judge = "face",
) -> RecognitionResult:
    """Recognition figures on ``directory``; ``face_policy`` chooses each reference's face (see :data:`FacePolicy`),
    ``judge`` who answers (the face matcher, or the model as PLVM asks it)."""
    if judge == "model" and protocol != "single":
        raise ConfigError("--judge model asks about one person at a time: it takes --protocol single")
    people = people_of(directory)
    with tempfile.TemporaryDirectory(prefix="plvm-eval-") as banks:
        config = config.model_copy(update={"bank": banks})
        enroller = Enroller(config)
        space = enroller.space
        users, skipped = {}, []
        for index, person in enumerate(people):
            user = f"eval-{index}" if protocol == "single" else "eval-all"
            try:
                enroller.enroll(user, person.name, [person.reference], face_policy=face_policy)
            except EnrollError as error:
                skipped.append(Skipped(person.name, str(error)))
                continue
            users[person.name] = user
        if not users:
            reasons = "; ".join(f"{s.person}: {s.reason}" for s in skipped)
            raise InputError(f"no person of {directory} could be enrolled ({reasons})")
        photos = {photo: person.name for person in people for photo in person.photos}
        if judge == "model":
            concepts = {name: enroller.store.load(user).concepts[0] for name, user in users.items()}
            decisions = model_decisions(config, concepts, photos)
            return _score(protocol, 0.5, decisions, [], face_policy, skipped, judge)
        faces = face_table(config, list(photos))
        decisions, rule = [], config.match.rule()
        for user in dict.fromkeys(users.values()):
            matched, scales = match_as(config, faces, user, space)
            bank = enroller.store.load(user)
            for concept in bank.concepts:
                scale = scales.get((user, concept.concept_id))
                decisions += [_decide(row, concept, scale, photos, rule) for row in matched]
    no_face = [row["path"] for row in faces.select(["path", "faces"]).to_pylist() if not row["faces"]]
    return _score(protocol, rule.limit, decisions, no_face, face_policy, skipped)


def _decide(row: dict, concept, scale: float | None, photos: dict[str, str], rule: MatchRule) -> Decision:
    """The answer to "is <concept> in this photo?" that the match stage gave for ``row``."""
    refs = concept.face_descriptors
    vectors = np.asarray([f["embedding"] for f in row["faces"] or []], np.float32).reshape(-1, refs.shape[1])
    distances = distance_matrix(vectors, [refs])
    scores = rule.scores(distances, [scale])[:, 0]
    distances = distances[:, 0]
    drawn = [
        {"box": f["box"], "concept": f.get("concept"), "distance": float(d)}
        for f, d in zip(row["faces"] or [], distances)
    ]
    nearest = float(distances.min()) if len(distances) else None
    score = float(scores.min()) if len(scores) else None
    return Decision(
        person=concept.name,
        photo=row["path"],
        positive=photos[row["path"]] == concept.name,
        predicted=concept.name in (row["concepts"] or []),
        distance=nearest,
        score=score,
        faces=drawn,
        width=row["width"] or 0,
        height=row["height"] or 0,
    )


def _accuracy(decisions: list[Decision], predicted: list[bool]) -> tuple[float, float]:
    pos = [p for d, p in zip(decisions, predicted) if d.positive]
    neg = [not p for d, p in zip(decisions, predicted) if not d.positive]
    return sum(pos) / max(len(pos), 1), sum(neg) / max(len(neg), 1)


def best_threshold(decisions: list[Decision]) -> float:
    """The score threshold of highest weighted accuracy: the middle of the widest gap that reaches it."""
    scores = np.array([d.score if d.score is not None else np.inf for d in decisions])
    positive = np.array([d.positive for d in decisions])
    values = np.unique(scores[np.isfinite(scores)])
    if len(values) == 0:
        return float("inf")
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    true_pos = np.searchsorted(pos, cuts, side="right") / max(len(pos), 1)
    true_neg = 1 - np.searchsorted(neg, cuts, side="right") / max(len(neg), 1)
    weighted = true_pos + true_neg
    best = np.flatnonzero(weighted >= weighted.max() - 1e-12)
    # runs of consecutive winning cuts; the widest run's middle is the most robust choice
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    widest = max(runs, key=lambda run: cuts[run[-1]] - cuts[run[0]])
    return float((cuts[widest[0]] + cuts[widest[-1]]) / 2)


@dataclass
class CrossValidation:
    positive_accuracy: float
    negative_accuracy: float
    weighted_accuracy: float
    thresholds: dict[str, float]
    """The threshold chosen without each person (leave-one-person-out)."""


def cross_validate(result: RecognitionResult) -> CrossValidation:
    """Leave one person out: choose the threshold on the others' questions, answer the person's questions with it.

    A person's questions are those where the person is enrolled or owns the photo.
    """
    owner = {}
    for d in result.decisions:
        if d.positive:
            owner[d.photo] = d.person
    people = sorted({d.person for d in result.decisions})
    predicted, held, thresholds = [], [], {}
    for person in people:
        train = [d for d in result.decisions if d.person != person and owner.get(d.photo) != person]
        test = [d for d in result.decisions if d.person == person or owner.get(d.photo) == person]
        thresholds[person] = best_threshold(train)
        held += test
        predicted += [d.score is not None and d.score <= thresholds[person] for d in test]
    pos, neg = _accuracy(held, predicted)
    return CrossValidation(pos, neg, (pos + neg) / 2, thresholds)


def _score(
    protocol: str,
    threshold: float,
    decisions: list[Decision],
    no_face: list[str],
    face_policy: FacePolicy,
    skipped: list[Skipped],
    judge: Judge = "face",
) -> RecognitionResult:
    pos = [d for d in decisions if d.positive]
    neg = [d for d in decisions if not d.positive]
    pos_acc = sum(d.predicted for d in pos) / len(pos)
    neg_acc = sum(not d.predicted for d in neg) / len(neg)

    def score(d: Decision) -> float:
        return -d.score if d.score is not None else -np.inf

    return RecognitionResult(
        protocol=protocol,
        positive_accuracy=pos_acc,
        negative_accuracy=neg_acc,
        weighted_accuracy=(pos_acc + neg_acc) / 2,
        n_positive=len(pos),
        n_negative=len(neg),
        roc_auc=roc_auc([score(d) for d in pos], [score(d) for d in neg]),
        threshold=threshold,
        face_policy=face_policy,
        judge=judge,
        no_face=sorted(no_face),
        skipped=skipped,
        decisions=decisions,
    )
