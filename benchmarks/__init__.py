"""Benchmarks that reproduce the label relaxation paper with KerasTuner."""
