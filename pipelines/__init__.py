"""Pipelines composed from the operators: the stage lists, caption, rematch, enroll, people (suggest, merge,
reject), forget, dataset, evaluation and report; the config (every default's one home); the runner
(``pipelines.runner``) that applies a list of steps; and the ``plvm`` command (``pipelines.cli``)."""
