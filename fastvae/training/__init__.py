"""Training: the Trainer (trainer) assembled from its parts (parts), the run folder and its lock,
Ctrl-C/SIGTERM handling (stopping), data parallelism across processes (distributed) and the
memory preflight.

May import every library package (nn, objectives, optim, backends, datasets, io, explore, bench for
the start-up choices); never fastvae.cli.
"""
