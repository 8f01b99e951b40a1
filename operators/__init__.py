"""Ray Data stages, one module each. The caption run's: read, index lookup, decode, detect, align, embed, index,
the cohort barrier, match, prompt, generate, write. A dataset build's: output rows, items, photo files, shards.
``base`` holds the stage descriptors (``Stage``, ``Barrier``, ``joined``, ``RowStage``), ``rows`` the row contract.

Each stage is a callable (a class when it holds a model, loaded once per actor) that maps a
``pyarrow.Table`` batch of photo rows to another, plus its config model. Stages adapt the
models of ``plvm_model`` to batches; they hold no model math."""
