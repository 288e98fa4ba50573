"""Machine-learning plumbing that inference and training share: loading models, building prompts.

Neutral ground: it imports nothing of yichui but :mod:`yichui.errors`, and torch, transformers
and peft only inside the functions that need them, so the API and the CLI import it without
starting torch, and neither capability depends on the other through it.

- :mod:`yichui.ml.loading`: the one device rule, the one dtype rule, and the tokenizer, model
  and adapter loaders (with :func:`~yichui.ml.loading.require_ml` for a missing extra).
- :mod:`yichui.ml.prompts`: a chat or a completion as the model reads it, in token ids.
"""
