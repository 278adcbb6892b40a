"""Benchmarks and probes of ember-train (not shipped in the wheel).

Run each from the repository root as a module, e.g. ``python -m benchmarks.bench_contrastive --help``;
what they share is in :mod:`benchmarks.common`. The numbers they produced are in ``docs/benchmarks.md``.
"""
