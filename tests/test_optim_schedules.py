
import numpy as np
import pytest

from fastvae import Adam, ConfigError, RunSettings, TrainConfig, backends
from fastvae.optim.schedules import beta_at, lr_at


def test_adam_matches_algorithm_1_by_hand():
    """Kingma & Ba 2015, Algorithm 1, written out in float64 for 3 steps."""
    be = backends.get("numpy", "float64")
    p = np.array([0.5, -1.0, 2.0])
    g = np.zeros(3)
    opt = Adam(be, p, g, lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    ref, m, v = p.copy(), np.zeros(3), np.zeros(3)
    for t in range(1, 4):
        grad = np.array([0.3, -0.2, 1.5]) * t
        g[:] = grad
        opt.step()
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        ref = ref - 0.1 * mhat / (np.sqrt(vhat) + 1e-8)
        np.testing.assert_allclose(p, ref, rtol=1e-14, atol=0)
    st = opt.state_dict()
    assert st["t"] == 3
    opt2 = Adam(be, p.copy(), g, lr=0.1)
    opt2.load_state_dict(st)
    np.testing.assert_array_equal(opt2.m, opt.m)
    np.testing.assert_array_equal(opt2.v, opt.v)


def test_adam_rejects_bad_settings():
    be = backends.get("numpy")
    p = be.zeros((3,))
    with pytest.raises(ConfigError, match="lr"):
        Adam(be, p, p, lr=-1)
    with pytest.raises(ConfigError, match="betas"):
        Adam(be, p, p, betas=(1.0, 0.9))


def cfg(**kw):
    return TrainConfig(**kw)


def test_beta_schedules():
    c = cfg(beta_schedule="constant", beta_max=4)
    assert beta_at(c, 0, 10) == 4 and beta_at(c, 9.9, 10) == 4
    c = cfg(beta_schedule="linear", beta_max=2, beta_delay=1, beta_warmup=4)
    assert beta_at(c, 0.5, 10) == 0
    assert beta_at(c, 1.0, 10) == 0
    assert beta_at(c, 3.0, 10) == pytest.approx(1.0)
    assert beta_at(c, 5.0, 10) == 2 and beta_at(c, 8, 10) == 2
    c = cfg(beta_schedule="sigmoid", beta_max=1, beta_warmup=2)
    assert beta_at(c, 1.0, 10) == pytest.approx(0.5)
    assert beta_at(c, 0.0, 10) < 0.003 and beta_at(c, 2.0, 10) > 0.997
    assert beta_at(c, 0.5, 10) < beta_at(c, 1.5, 10)
    assert beta_at(c, 2.0, 10) == 1 and beta_at(c, 9.9, 10) == 1     # the final weight: it stayed at 0.9975
    c = cfg(beta_schedule="cyclical", beta_max=1, beta_cycles=2, beta_ratio=0.5)
    # 10 epochs, 2 cycles of 5 epochs: ramp over 2.5 epochs then flat
    assert beta_at(c, 0, 10) == 0
    assert beta_at(c, 1.25, 10) == pytest.approx(0.5)
    assert beta_at(c, 3, 10) == 1
    assert beta_at(c, 5, 10) == 0
    assert beta_at(c, 6.25, 10) == pytest.approx(0.5)


def test_lr_schedules():
    assert lr_at(cfg(lr=0.01), 1234, 100, 10) == 0.01
    c = cfg(lr=0.01, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.5)
    assert lr_at(c, 199, 100, 10) == 0.01 and lr_at(c, 200, 100, 10) == 0.005
    assert lr_at(c, 450, 100, 10) == 0.0025
    c = cfg(lr=0.01, lr_schedule="cosine", lr_min=0.001)
    assert lr_at(c, 0, 100, 10) == pytest.approx(0.01)
    assert lr_at(c, 999, 100, 10) == pytest.approx(0.001)
    assert lr_at(c, 999 / 2, 100, 10) == pytest.approx(0.0055)


def test_resuming_with_another_length_names_the_schedule_jump(tmp_path, capsys):
    """Cosine lr and cyclical beta are laid over the run's epochs: resumed
    with another --epochs they jumped without a word (a finished 2-epoch
    cosine run at lr 0 went on at 4.7e-4)."""
    from fastvae.optim.schedules import resume_note
    c = cfg(lr=0.01, lr_schedule="cosine", lr_min=0.001)
    note = resume_note(c, 500, 100, 10, 20)           # half-way through a 10-epoch run, stretched to 20
    assert f"lr from {lr_at(c, 500, 100, 10):.3g} to {lr_at(c, 500, 100, 20):.3g}" in note
    assert "resume with epochs=10 to keep it" in note
    assert "keep it" not in resume_note(c, 1000, 100, 10, 20)        # a finished run: no way to keep it
    cy = cfg(beta_schedule="cyclical", beta_cycles=4)
    assert "cyclical beta from 1 to 0.5" in resume_note(cy, 125, 100, 10, 20)   # ratio 0.5: periods of 2.5 and 5 epochs
    for same in (resume_note(c, 500, 100, 10, 10), resume_note(cfg(lr=0.01), 500, 100, 10, 20),
                 resume_note(cfg(beta_schedule="linear", beta_warmup=3), 150, 100, 10, 20)):
        assert same == ""                                # nothing moves: no note
    from conftest import tiny_trainer
    from fastvae import Trainer
    t = tiny_trainer(tmp_path, epochs=2, lr_schedule="cosine")
    t.fit(pictures=False)
    capsys.readouterr()
    Trainer.from_checkpoint(tmp_path / "checkpoint.h5", epochs=4, dataset=t.data, progress=False)
    assert "fastvae: note: epochs=4 instead of the run's 2 stretches its schedule" in capsys.readouterr().err
    Trainer.from_checkpoint(tmp_path / "checkpoint.h5", dataset=t.data, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1e-3), "lr"), (dict(batch_size=0), "batch_size"), (dict(epochs=-1), "epochs"),
    (dict(beta_schedule="warm"), "beta_schedule"), (dict(lr_schedule="exp"), "lr_schedule"),
    (dict(beta_max=float("nan")), "beta_max"), (dict(betas=(0.9, 1.0)), "betas")])
def test_train_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_tf32_only_for_the_gpu_backend():
    with pytest.raises(ConfigError, match="tf32 applies to the cupy backend only"):
        RunSettings(tf32=True, backend="numpy")
    assert RunSettings(tf32=True, backend="cupy").tf32


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_adam_result_does_not_depend_on_its_chunking(dtype, monkeypatch):
    """The NumPy Adam runs in cache-sized chunks: the same operations per
    element, so any chunk size (here 5 elements, a ragged last chunk) gives
    the one-pass result bit for bit."""
    from fastvae import backends
    from fastvae.backends.numpy_backend import NumpyBackend
    r = np.random.default_rng(0)
    init = [r.normal(size=1003).astype(dtype) for _ in range(4)]
    init[3] = np.abs(init[3])
    out = []
    for chunk in (1 << 30, 5 * np.dtype(dtype).itemsize):
        monkeypatch.setattr(NumpyBackend, "ADAM_CHUNK_BYTES", chunk)
        be = backends.get("numpy", dtype)
        p, g, m, v = (a.copy() for a in init)
        for _ in range(3):
            be.adam_update(p, g, m, v, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=0.7,
                           weight_decay=0.01, decay_factor=0.999)
        out.append((p, m, v))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(out[0][0], init[0])
