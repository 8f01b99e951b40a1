"""Model code of plvm-pipeline, free of Ray: faces (detection, alignment, descriptors, matching, the clustering
of suggested people), the PLVM Aligner and concept encoder, MyVLM's trainer, concept injection and PLVM's concept
token, the engines, the published configurations of the real models and random weights built from them, the model
cache and the tiny test models; and, in ``store``, the stored state.

The Ray Data stages in ``operators`` adapt these pieces to batches."""

__version__ = "0.1.0"
