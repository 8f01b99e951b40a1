"""Pipelines composed from the operators: caption, enroll, evaluate; and the ``plvm`` command."""
