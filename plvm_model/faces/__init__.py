"""Face detection (MTCNN), alignment and embedding (dlib), matching against a bank, and the clustering of the
faces nobody named."""

from plvm_model.faces.detector import Face, FaceDetector, MTCNNDetector
from plvm_model.faces.embedder import DlibEmbedder, FaceEmbedder, embedder_class, make_embedder

__all__ = ["Face", "FaceDetector", "MTCNNDetector", "FaceEmbedder", "DlibEmbedder", "embedder_class", "make_embedder"]
