"""Behaviour recorded by the release before the layers refactor (see
tests/fixtures/make_fixtures.py): later code must reproduce it bit for bit on
the NumPy backend, and load and resume its format-1 checkpoint."""

import importlib.util
import os
import shutil

import numpy as np
import pytest

import fastvae

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
_spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIX, "make_fixtures.py"))
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)
RECORD = np.load(os.path.join(FIX, "trajectories.npz"))
FORMAT1 = os.path.join(FIX, "format1_checkpoint.h5")


@pytest.mark.parametrize("name", sorted(mf.RUNS))
def test_two_epochs_bit_identical_to_the_recorded_release(name):
    t = mf.trainer(name)
    t.fit(pictures=False)
    got = t.model.get_flat_params()
    want = RECORD[name + "/params"]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max():.3g}"
    assert np.array_equal([r["train_loss"] for r in t.history], RECORD[name + "/train_loss"])


def test_numba_follows_the_recorded_float64_trajectory():
    pytest.importorskip("numba")
    name = "mlp_relu_bernoulli_f64"
    t = mf.trainer(name, backend="numba")
    t.fit(pictures=False)
    want = RECORD[name + "/params"]
    # float64 kernels that sum in another order: rounding ~1e-16 per op, grown
    # over 12 Adam steps; 1e-9 relative leaves orders of magnitude of margin
    np.testing.assert_allclose(t.model.get_flat_params(), want, rtol=1e-9, atol=1e-12)


def test_format1_checkpoint_loads():
    model = fastvae.load(FORMAT1, backend="numpy")
    assert model.config.hidden == [24, 12] and model.config.latent_dim == 3
    assert model.checkpoint["meta"]["format_version"] == 1          # written by the first release
    assert model.checkpoint["epoch"] == 1 and model.checkpoint["adam_t"] == 6
    mu, logvar = model.encode(mf.dataset().x_test)
    assert mu.shape == (32, 3) and np.isfinite(mu).all() and np.isfinite(logvar).all()


def test_format1_checkpoint_resumes_to_the_recorded_second_epoch(tmp_path):
    ck = tmp_path / "checkpoint.h5"
    shutil.copy(FORMAT1, ck)
    t = fastvae.Trainer.from_checkpoint(str(ck), epochs=2, dataset=mf.dataset(), progress=False)
    assert t.epoch == 1
    t.fit(pictures=False)
    assert np.array_equal(t.model.get_flat_params(), RECORD["mlp_relu_bernoulli_f32/params"])
