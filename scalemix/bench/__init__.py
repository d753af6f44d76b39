"""Benchmarks (``scalemix bench ...``): medians of repeated runs and ratios, never timed tests."""
