"""Benchmarks of whole episodes and of stages, across backends (`fssam bench`)."""
