"""Ray Data stages, one module each: read, index lookup, decode, detect, align, embed, index, match, prompt,
generate, write.

Each stage is a callable (a class when it holds a model, loaded once per actor) that maps a
``pyarrow.Table`` batch of photo rows to another, plus its config model. Stages adapt the
models of ``plvm_model`` to batches; they hold no model math.
"""
