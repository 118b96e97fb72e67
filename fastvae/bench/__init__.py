"""The benchmark harness behind ``fastvae bench`` and ``bench/*.py``: the harness, interleaved timing,
the workloads, and the PyTorch twin of a VAE (reference tests and benchmarks).

May import every library package; never fastvae.cli.
"""
