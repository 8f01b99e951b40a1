"""Stage 3, detect: faces, scores and 5-point landmarks with MTCNN (one model per actor)."""

from __future__ import annotations

from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import face_record, row_pixels
from plvm_model.faces import MTCNNDetector


class DetectConfig(StageConfig):
    long_side: int = Field(1024, ge=64, description="MTCNN runs on a copy resized to this long side.")
    min_face_size: int = Field(20, ge=8, description="MTCNN's smallest face, in pixels of that copy.")
    score_threshold: float = Field(0.9, ge=0, le=1, description="Faces with a lower detection score are dropped.")
    device: str = Field(
        "cpu", description="torch device of MTCNN (`cuda`: give the detect actors a share of a GPU, `num_gpus`)."
    )
    resources: Resources = Field(
        Resources(), description="The MTCNN actors (which also decode the photos and cut the faces' chips)."
    )


class DetectFaces(RowStage):
    """pixels -> faces (box, score, landmarks in the original photo's pixels), left to right; a row whose faces
    came from the face index is passed by."""

    needs = ("pixels", "width")
    adds = ("faces",)

    def __init__(self, config: DetectConfig) -> None:
        import torch

        torch.set_num_threads(config.resources.torch_threads())
        self.detector = MTCNNDetector(
            long_side=config.long_side, min_face_size=config.min_face_size, score_threshold=config.score_threshold,
            device=config.device,
        )  # fmt: skip

    def process(self, row: dict) -> None:
        if row.get("faces") is not None:  # from the face index
            return
        scale = row["width"] / row["pixels_width"]
        row["faces"] = [face_record(f.scaled(scale)) for f in self.detector.detect(row_pixels(row))]
        self.stat_update("photos")
        self.stat_update("faces", len(row["faces"]))


def stage(config: DetectConfig) -> Stage:
    return Stage.of("detect", DetectFaces, (config,), config.resources, actors=True)
