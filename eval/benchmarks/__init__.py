"""Benchmarks: one module per task, each a ``Benchmark`` that loads samples, builds prompts and scores."""
