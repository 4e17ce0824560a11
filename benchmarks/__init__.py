"""nanoopt benchmarks: run one with ``python -m benchmarks.NAME``, all with ``python benchmarks/run.py``."""
