"""Data-parallel training across processes (MPI) and GPUs (NCCL).

One flat gradient buffer makes data parallelism one all-reduce per step.
The engines are the ones clusters already run: MPI (``mpi4py`` over MPICH,
Open MPI, Intel MPI, or what ``srun`` starts) across processes and hosts,
and NCCL (CuPy's binding, its unique id broadcast over MPI) across GPUs.

How a step is split (``--batch-size`` stays the GLOBAL batch ``B``): every
rank draws the global batch's random numbers (permutation, binarization
uniforms, ``eps``) from the same seeded stream, keeps rows
``[r B / W, (r + 1) B / W)`` of them (:func:`shard`), computes the gradient
of ``(1 / B) sum_i loss_i`` over its rows, and :class:`AllReduceGrads` sums
the flat gradients before the optimizer's other hooks (clipping) and the
Adam kernel. The result equals the one-process gradient up to summation
order, so a seed gives the same model on 1 or N ranks, and every rank holds
the same parameters, optimizer and random state; rank 0 alone writes the run
folder, and its checkpoints resume on any number of ranks.

Without ``mpi4py``, or outside ``mpiexec``/``srun``, :func:`world` is the
one-process :class:`World` and nothing changes.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np

from fastvae.errors import BackendUnavailableError, ConfigError
from fastvae.naming import option

# environment variables launchers set: (size variable, rank variable)
_LAUNCHERS = (("PMI_SIZE", "PMI_RANK"),                       # MPICH / Hydra, Intel MPI
              ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI
              ("PMIX_SIZE", "PMIX_RANK"),                     # PMIx launchers
              ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))  # MVAPICH
# srun sets the step's task count in each task; a batch script or an salloc shell inside an
# allocation of N tasks has SLURM_NTASKS=N but is one process (and must train as one)
_SLURM = ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID")
ABORT_GRACE_S = 0.5        # seconds between an error's message and MPI_Abort (see MPIWorld.abort)


def launched_size() -> int:
    """The world size a launcher announces in the environment (1 when none)."""
    for size_var, _ in _LAUNCHERS + (_SLURM,):
        try:
            n = int(os.environ.get(size_var, "1"))
        except ValueError:
            continue
        if n > 1:
            return n
    return 1


def shard(n: int, rank: int, size: int):
    """``(lo, hi)``: rank ``rank``'s rows of ``n``; sizes differ by at most one,
    and a rank may get none when ``n < size``."""
    return (rank * n) // size, ((rank + 1) * n) // size


class World:
    """One process: rank 0 of 1; every collective is the identity."""

    rank = 0
    size = 1
    name = "single"

    def allreduce_(self, buf):
        """Sum ``buf`` (a host or device array) over ranks, in place."""
        return buf

    def sum(self, values: Sequence[float]) -> list:
        """Sum a few host numbers over ranks."""
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        return bool(flag)

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable Python data)."""
        return obj

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        """End every rank (after an error on one, so the others never hang)."""

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class MPIWorld(World):
    """MPI_COMM_WORLD through mpi4py. Host buffers are reduced with
    ``Allreduce(IN_PLACE, SUM)``; device (CuPy) buffers are passed straight to
    MPI when the library is CUDA-aware, else staged through host memory."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = _mpi_cuda_aware(MPI)

    def allreduce_(self, buf):
        MPI = self.MPI
        if isinstance(buf, np.ndarray) or self.cuda_aware:
            if not isinstance(buf, np.ndarray):
                _device_sync(buf)
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return buf
        host = buf.get()
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        buf.set(host)
        return buf

    def sum(self, values):
        arr = np.asarray(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)
        return [float(v) for v in arr]

    def any(self, flag):
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code):
        """Flush, give the launcher ABORT_GRACE_S to forward what this rank
        wrote, then MPI_Abort: without the pause the kill that Abort starts
        could end the launcher's output forwarding first (mpich's hydra lost
        both ranks' one-line errors once in about ten full test runs, in
        ``test_an_error_on_the_ranks_ends_the_job_with_one_line_each``; not
        reproduced in 30 runs of that test alone, with or without the pause)."""
        import time
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


class NcclWorld(MPIWorld):
    """MPI for control and host numbers; NCCL (``cupy.cuda.nccl``) for device
    gradient buffers. One process per GPU: rank r uses device ``r % (GPUs)``.
    The NCCL unique id is made on rank 0 and broadcast over MPI."""

    name = "nccl"

    def __init__(self):
        super().__init__()
        import cupy
        from cupy.cuda import nccl
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl, self.cupy = nccl, cupy
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def allreduce_(self, buf):
        if isinstance(buf, np.ndarray):
            return super().allreduce_(buf)
        dtype = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                 np.dtype(np.float64): self.nccl.NCCL_FLOAT64}[np.dtype(buf.dtype)]
        stream = self.cupy.cuda.get_current_stream().ptr
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, self.nccl.NCCL_SUM, stream)
        return buf


def _mpi_cuda_aware(MPI) -> bool:
    """Whether the MPI library accepts device pointers (Open MPI's extension query)."""
    query = getattr(MPI, "Query_cuda_support", None)       # mpi4py >= 4 on an MPI with the extension
    try:
        return bool(query()) if query else False
    except Exception:
        return False


def _device_sync(buf) -> None:
    try:
        import cupy
        cupy.cuda.get_current_stream().synchronize()
    except Exception:
        pass


_WORLD: Optional[World] = None


def current() -> Optional[World]:
    """The process group if :func:`world` has made one, else None (never starts MPI)."""
    return _WORLD


def world(backend: Optional[str] = None) -> World:
    """The process group this run belongs to (created once per process).

    Under ``mpiexec``/``srun`` with more than one rank: an :class:`MPIWorld`,
    or an :class:`NcclWorld` when ``backend`` is ``"cupy"``; else a
    :class:`World` of one. Raises BackendUnavailableError when a launcher
    started several ranks but mpi4py (or, for cupy, NCCL) is missing.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    n = launched_size()
    if n <= 1:
        _WORLD = World()
        return _WORLD
    try:
        import mpi4py  # noqa: F401  (is it installed?)
    except ImportError:
        raise BackendUnavailableError(f"started as one of {n} ranks but mpi4py is not installed; "
                                      "pip install 'fastvae[mpi]' (or run without mpiexec)") from None
    if backend == "cupy":
        try:
            _WORLD = NcclWorld()
        except ImportError:
            raise BackendUnavailableError("cupy on several ranks needs NCCL (cupy.cuda.nccl); install "
                                          "cupy with NCCL support, or run one rank per host") from None
    else:
        _WORLD = MPIWorld()
    return _WORLD


def agree_on_streaming(comm: World, streamed: bool) -> bool:
    """``streamed`` when every rank's data streams from disk or none does;
    else ConfigError on every rank: each rank decides from its own free memory
    (a default budget), and a rank that streamed drew other batches than one
    that loaded the file (the batch order of a chunked read), silently."""
    if comm.size > 1 and comm.any(streamed) and comm.any(not streamed):
        raise ConfigError("the ranks disagree on streaming the data from disk (their free memory differs); set "
                          f"{option('memory_budget_mb')} (MB), the same for every rank, so that they all decide alike")
    return streamed


def threads_per_rank(comm: World) -> Optional[int]:
    """Compute threads for each rank when several share a host and the user
    set none: the host's cores divided by the ranks on it (the launcher's
    local size, else the world size); None for a single process."""
    if comm.size == 1:
        return None
    local = 0
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        try:
            local = int(os.environ.get(var, "0").split("(")[0])
        except ValueError:
            continue
        if local > 0:
            break
    return max(1, (os.cpu_count() or 1) // (local or comm.size))


class AllReduceGrads:
    """Optimizer hook: sum the flat gradient over ranks in one call. Placed
    first, before clipping, so every later hook sees the global gradient
    (each rank scaled its rows by 1 / global batch, so the sum is the mean)."""

    def __init__(self, comm: World):
        self.comm = comm

    def __call__(self, opt) -> None:
        self.comm.allreduce_(opt.grads)
