import os
import sys

import numpy as np
import pytest

import fastvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
OLIVETTI_DIR = os.path.join(SHARED_DATA, "olivetti")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device")
    config.addinivalue_line("markers", "slow: long-running, excluded from the default run")


def pytest_report_header(config):
    return f"fastvae {fastvae.__version__} from {os.path.dirname(fastvae.__file__)}"


needs_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"real MNIST not found in {MNIST_DIR}")
needs_olivetti = pytest.mark.skipif(
    not os.path.exists(os.path.join(OLIVETTI_DIR, "olivetti_faces.npz")),
    reason=f"Olivetti faces not found in {OLIVETTI_DIR}")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
