"""Benchmarks: synthetic scenes with exact ground truth, accuracy metrics and the plain-pycolmap baseline."""
