"""The model: the VAE walk (model), the flat parameter layout, the layer types (layers/: one file per
layer type), the built-in architectures as data, and the op-code table shared with the kernels.

May import: fastvae.errors, config-free helpers (naming, checks), fastvae.backends, fastvae.kernels.
"""
