"""Benchmarks of ComDefend purification and training (see BENCHMARKS.md)."""
