"""Experiment drivers (CV, comparisons, benchmarks) and the `oncofed` command line."""
