"""CPU tuning, shared by the NumPy and Numba backends: BLAS and Numba thread control (threads),
the GEMM library by name or measurement (gemm_library), and the interleaved comparison that
start-up choices measure with (compare).

May import: fastvae.errors, fastvae.naming, fastvae.io.safe_files (the cache file).
"""
