"""The benchmarks: run from the repository root as `python -m benchmarks.NAME` (README.md in this folder)."""
