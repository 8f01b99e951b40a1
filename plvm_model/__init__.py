"""Model code of plvm-pipeline: faces, the PLVM Aligner, concept injection and the engines.

Everything here is tensor-level and free of Ray; the Ray Data stages in ``operators``
adapt these pieces to batches.
"""

__version__ = "0.1.0"
