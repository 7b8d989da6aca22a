"""Reproducible measurements (DESIGN §2): one script per study, run from the repository root as
``python -m benchmarks.<script> [--help]``; each writes JSON/CSV (and plots) under
``benchmarks/results/`` with its configuration, the machine and the code version attached.

Shared helpers: :mod:`benchmarks._common` (provenance, result files, tables) and
:mod:`benchmarks.measure` (interleaved timing, masks for speed-up studies, inference
transforms).  The library (``mipprune``, ``nn``) never imports this package.
"""
