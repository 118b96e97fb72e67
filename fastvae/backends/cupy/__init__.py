"""The CuPy (NVIDIA GPU) backend: the backend (backend), its RawModule kernels and launch
arguments (kernels), the device probe (probe), and CUDA-graph capture and replay
(cuda_graph, graph_support).

May import: fastvae.backends.base, fastvae.backends.philox, fastvae.nn.opcodes, fastvae.errors,
fastvae.kernels (CUDA sources).
"""
