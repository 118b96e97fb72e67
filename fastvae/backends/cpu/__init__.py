"""CPU tuning, shared by the NumPy and Numba backends: BLAS and Numba thread control (threads),
the GEMM library by name or measurement (gemm_library), each convolution layer's algorithm by
measurement (conv_choice), and the interleaved comparison that start-up choices measure with (compare).

May import: fastvae.errors, fastvae.naming, fastvae.io.safe_files (the cache file).
"""
