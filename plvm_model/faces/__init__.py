"""Face detection (MTCNN), alignment and embedding (dlib), and matching against a bank."""

from plvm_model.faces.detector import Face, FaceDetector, MTCNNDetector
from plvm_model.faces.embedder import DlibEmbedder, FaceEmbedder, embedder_class, make_embedder

__all__ = ["Face", "FaceDetector", "MTCNNDetector", "FaceEmbedder", "DlibEmbedder", "embedder_class", "make_embedder"]
