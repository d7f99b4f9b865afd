"""Benchmarks, metrics and evaluation runners for DyMU-merged vision-language models."""
