"""Evaluation: prompt sets, quality checks and lossless checks."""
