"""Model code of plvm-pipeline, free of Ray: faces (detection, alignment, descriptors, matching), the PLVM Aligner
and concept encoder, MyVLM's trainer, concept injection and PLVM's concept token, the engines, the tiny test models;
and, in ``store``, the stored state (banks, face index, output table, leases).

The Ray Data stages in ``operators`` adapt these pieces to batches.
"""

__version__ = "0.1.0"
