import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "fastvae" / "__init__.py").read_text()).group(1)

setup(
    name="fastvae",
    version=version,
    description="Variational autoencoders with hand-derived gradients on NumPy, Numba and CuPy backends",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(where=str(here), include=["fastvae", "fastvae.*"]) + ["fastvae.kernels"],
    package_dir={"fastvae.kernels": "kernels"},
    package_data={"fastvae.kernels": ["*.cu", "*.cuh"]},
    # Numba is the CPU engine (--backend auto picks it without a GPU); CuPy stays an extra (wheels per CUDA major)
    install_requires=["numpy>=1.22", "numba>=0.57", "h5py>=3.0", "matplotlib>=3.5", "tqdm>=4.60", "Pillow>=9.0",
                      "threadpoolctl>=3.1", "psutil>=5.8"],
    extras_require={
        "numba": [],            # kept so that older install commands still work: Numba is a dependency now
        # CuPy with the CUDA toolkit wheels (NVRTC, cuBLAS, ...): a driver is all the host needs
        "cuda12": ["cupy-cuda12x[ctk]>=14"],
        "cuda13": ["cupy-cuda13x[ctk]>=14"],
        # CuPy and NVRTC only: builds and compiles the CUDA kernels on a machine with no GPU (CI)
        "nvrtc": ["cupy-cuda12x>=14", "nvidia-cuda-nvrtc-cu12>=12.2"],
        "test": ["pytest>=7", "hypothesis>=6", "tensorboardX>=2.6"],
        # TensorBoard logging of the epoch metrics (fastvae.training.extensions.TensorBoardWriter); no PyTorch
        "tensorboard": ["tensorboardX>=2.6"],
        "mpi": ["mpi4py>=3.1", "mpich>=4"],
        # Intel MKL as a second GEMM library for the CPU backends (--blas mkl / auto)
        "mkl": ["mkl>=2023"],
        # the documentation site: mkdocs build --strict (docs/, mkdocs.yml)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": ["fastvae=fastvae.cli:main"]},
)
