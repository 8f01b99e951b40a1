"""``python -m pipelines.cli``: the ``plvm`` command."""

from pipelines.cli import main

main()
