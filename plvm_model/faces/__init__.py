"""Face detection (MTCNN), alignment and embedding (dlib), and matching against a bank."""

from plvm_model.faces.detector import Face, FaceDetector, MTCNNDetector
from plvm_model.faces.embedder import DlibEmbedder, FaceEmbedder, make_embedder

__all__ = ["Face", "FaceDetector", "MTCNNDetector", "FaceEmbedder", "DlibEmbedder", "make_embedder"]
