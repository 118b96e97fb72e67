import os
import subprocess
import sys

# The recorded trajectories of test_fixtures.py are bit for bit under OpenBLAS's
# Haswell kernels, which the machines that recorded them ran; OpenBLAS picks other
# kernels on AVX-512 CPUs (SkylakeX, Zen 4) whose GEMM sums round differently
# (5.6e-17 after two epochs). Pinned before NumPy loads OpenBLAS; subprocesses inherit it.
os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
# Runs that name no backend train on the reference, as before --backend auto: the tests that
# check what auto picks clear this (test_new_user.py); subprocesses inherit it.
os.environ["FASTVAE_BACKEND"] = "numpy"
os.environ.setdefault("FASTVAE_CONV", "im2col")      # one algorithm for every test but those that choose

import numpy as np  # noqa: E402
import pytest

import fastvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = [sys.executable, "-m", "fastvae"]

# The suite tests THIS working tree: an installed copy elsewhere would hide every edit.
_IMPORTED = os.path.dirname(os.path.abspath(fastvae.__file__)) if fastvae.__file__ else str(list(fastvae.__path__))
if _IMPORTED != os.path.join(ROOT, "fastvae"):
    pytest.exit(f"the tests import fastvae from {_IMPORTED}, not from this checkout "
                f"({ROOT}); install it editable: pip install -e '.[test,mpi,nvrtc]'", returncode=4)
#: the real-data folder (mnist/, olivetti/): $FASTVAE_TEST_DATA, else ../shared/data beside the checkout
SHARED_DATA = os.path.normpath(os.path.expanduser(os.environ.get("FASTVAE_TEST_DATA")
                                                  or os.path.join(ROOT, "..", "shared", "data")))
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
OLIVETTI_DIR = os.path.join(SHARED_DATA, "olivetti")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device")
    config.addinivalue_line("markers", "slow: long-running, excluded from the default run")


def pytest_report_header(config):
    return f"fastvae {fastvae.__version__} from {_IMPORTED}"


needs_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"real MNIST not found in {MNIST_DIR} (set FASTVAE_TEST_DATA to the folder holding mnist/)")
needs_olivetti = pytest.mark.skipif(
    not os.path.exists(os.path.join(OLIVETTI_DIR, "olivetti_faces.npz")),
    reason=f"Olivetti faces not found in {OLIVETTI_DIR} (set FASTVAE_TEST_DATA to the folder holding olivetti/)")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# ---------------------------------------------------------------- shared helpers
# VmHWM (this process image's peak RSS), not getrusage's ru_maxrss, which Linux
# carries over from the forking parent (a large pytest process) across exec.
PEAK_RSS = ("import re; print('RSS_MB', int(re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1)) / 1024)")


def fv(*args, cwd, check=True, timeout=600, **kw):
    """Run ``python -m fastvae ARGS`` in ``cwd``; the CompletedProcess (text
    output captured). With ``check``, a non-zero exit fails with both streams."""
    p = subprocess.run(PY + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def write_mnist_like(folder, n_train=50, n_test=20, gz=True, seed=0):
    """The four MNIST idx files of random uint8 images and labels in ``folder``;
    returns ``{file stem: array}``."""
    from fastvae.datasets import write_idx
    r = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {"train-images-idx3-ubyte": r.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": r.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": r.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": r.integers(0, 10, n_test, dtype=np.uint8)}
    for k, a in arrays.items():
        write_idx(os.path.join(folder, k + ext), a)
    return arrays


def tiny_trainer(out=None, backend="numpy", *, data=None, n=400, data_seed=6, hidden=(24,), latent=3,
                 epochs=3, batch_size=16, seed=2, data_config=None, extensions=None, **train_kw):
    """A Trainer of a small MLP on 16x16 sprites (``n`` images, or ``data``)."""
    from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, datasets
    data = data if data is not None else datasets.make_sprites(n, seed=data_seed, size=16)
    mc = ModelConfig(input_dim=256, hidden=list(hidden), latent_dim=latent, image_shape=(16, 16))
    from fastvae.config import RUN_SETTINGS, RunSettings
    run = {k: train_kw.pop(k) for k in list(train_kw) if k in RUN_SETTINGS}
    tc = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, **train_kw)
    return Trainer(mc, tc, data_config or DataConfig(), dataset=data, out=str(out) if out else None,
                   progress=False, extensions=extensions, settings=RunSettings(backend=backend, **run))


# ------------------------------------------------- numeric gradients (float64)
# With step h = 1e-6 in float64 the central difference has truncation error
# ~h^2 |f'''| ~ 1e-12 and rounding error ~2^-52 |f| / h ~ 2e-10 |f|; assert_grad
# allows 1e-7 (1 + |f|) + 1e-6 max|grad|.
H = 1e-6


def numgrad(f, x):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + H
        fp = f()
        x[i] = old - H
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * H)
    return g


def assert_grad(ana, num, fval):
    tol = 1e-7 * (1 + abs(fval)) + 1e-6 * np.abs(num).max()
    err = np.abs(ana - num).max()
    assert err <= tol, f"max |analytic - numeric| = {err:.3e} > {tol:.3e}"


def randomize_flows(model, seed=0, scale=0.5):
    """Give a model's IAF output layers (``flow.t.m``, ``flow.t.s``: zero at
    initialisation) random N(0, scale^2) values, as after training, so that
    gradient paths through them are not zero; returns the model."""
    r = np.random.default_rng([seed, 77])
    host = model.get_flat_params()
    for name in model.state_dict():
        parts = name.split(".")
        if parts[0] == "flow" and len(parts) == 4 and parts[2] in ("m", "s"):
            v = model.layout.view(host, name)
            v[...] = scale * r.normal(size=v.shape)
    model.set_flat_params(host)
    return model


def full_gradient_check(cfg, beta=0.7, B=4, seed=0, backend="numpy"):
    """The whole loss of a float64 VAE built from ``cfg`` on ``backend`` (IAF
    output layers made non-zero: :func:`randomize_flows`): loss_and_grad's
    gradient against central differences through the sampler (fixed eps)."""
    from fastvae import VAE
    model = randomize_flows(VAE(cfg, backend, seed=seed), seed)
    r = np.random.default_rng(seed + 1)
    x = r.random((B, cfg.input_dim))
    eps = r.normal(size=(B, cfg.latent_dim))
    p0 = model.get_flat_params()

    def loss():
        ws = model.forward(x, eps)
        return float((ws.nll.sum() + beta * ws.kl.sum()) / B)

    recon, kl = model.loss_and_grad(x, eps, beta)
    ana = model.grads.copy()
    assert np.isclose((recon + beta * kl) / B, loss(), rtol=1e-13)
    num = numgrad(loss, model.params)     # perturbs the live flat buffer
    np.testing.assert_array_equal(model.get_flat_params(), p0)
    assert_grad(ana, num, loss())
    return model
