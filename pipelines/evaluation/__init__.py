"""Evaluation through the caption pipeline's own stages: recognition ("is P in this photo?", by the face matcher
or the model), MyVLM's caption metric, and PLVM's multiple-choice VQA."""
