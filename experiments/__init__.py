"""Experiments on the rungs: comparisons, the D-sweep, ablations; shared runner in runner.py, outputs in docs/."""
