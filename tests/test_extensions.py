"""Trainer extensions (fastvae.training.extensions): the public hook into
training, triggered every N epochs or steps, and TensorBoard logging through
tensorboardX."""

import os
import struct

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError
from fastvae.training.extensions import TensorBoardWriter

from conftest import tiny_trainer


class Recorder:
    def __init__(self, trigger):
        self.trigger, self.calls, self.finalized = trigger, [], 0

    def __call__(self, trainer, metrics):
        self.calls.append((trainer.epoch, trainer.step, dict(metrics)))

    def finalize(self, trainer):
        self.finalized += 1


def test_epoch_and_step_extensions_fire_on_their_triggers(tmp_path):
    every_epoch, every_other, steps = Recorder(("epoch", 1)), Recorder(("epoch", 2)), Recorder(("step", 7))
    t = tiny_trainer(tmp_path / "run", epochs=3, extensions=[every_epoch, every_other, steps])
    t.fit(pictures=False)
    assert [c[2] for c in every_epoch.calls] == t.history             # each epoch's metrics row, as saved
    assert [c[0] for c in every_other.calls] == [2]
    spe = t.steps_per_epoch()
    assert [c[1] for c in steps.calls] == list(range(7, 3 * spe + 1, 7))
    assert all(set(c[2]) == {"epoch", "step", "beta", "lr"} for c in steps.calls)
    assert every_epoch.finalized == every_other.finalized == steps.finalized == 1


def test_the_built_in_evaluator_checkpointer_and_reporter_are_extensions_of_the_same_protocol(tmp_path):
    """They pass the protocol's check, run in order (scores, then the
    checkpoint, then the epoch line) before the user's, which sees the epoch's
    test score and its checkpoint on disk."""
    from fastvae.training.extensions import check_extensions
    seen = []

    class Look:
        trigger = ("epoch", 1)

        def __call__(self, trainer, metrics):
            from fastvae.io.checkpoint import read_checkpoint
            seen.append((metrics["test_neg_elbo"], int(read_checkpoint(trainer.checkpoint_path)["state"]["epoch"]),
                         metrics["epoch"]))

    t = tiny_trainer(tmp_path / "run", epochs=2, extensions=[Look()])
    assert check_extensions(t.builtin_extensions) == [t.evaluator, t.checkpointer, t.reporter]
    t.fit(pictures=False)
    assert len(seen) == 2 and all(s[0] is not None and np.isfinite(s[0]) and s[1] == s[2] for s in seen)
    assert [row["test_neg_elbo"] for row in t.history] == [s[0] for s in seen]


def test_extensions_do_not_change_training(tmp_path):
    a = tiny_trainer(tmp_path / "a", epochs=2)
    a.fit(pictures=False)
    b = tiny_trainer(tmp_path / "b", epochs=2, extensions=[Recorder(("step", 1)), Recorder(("epoch", 1))])
    b.fit(pictures=False)
    np.testing.assert_array_equal(a.model.get_flat_params(), b.model.get_flat_params())


def test_fastvae_train_takes_extensions():
    rec = Recorder(("epoch", 1))
    t = fastvae.train("sprites", n_sprites=200, hidden=[16], latent_dim=2, epochs=2, batch_size=50,
                      extensions=[rec])
    assert [c[2]["epoch"] for c in rec.calls] == [1, 2] and rec.calls[-1][2] == t.history[-1]


def test_an_extension_that_raises_stops_training_with_the_epochs_checkpoint_intact(tmp_path):
    class Boom:
        trigger = ("epoch", 1)

        def __call__(self, trainer, metrics):
            if metrics["epoch"] == 2:
                raise RuntimeError("boom")
    t = tiny_trainer(tmp_path / "run", epochs=3, extensions=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(pictures=False)
    assert fastvae.load(tmp_path / "run").checkpoint["epoch"] == 2


@pytest.mark.parametrize("bad, needle", [
    (object(), "needs a trigger"),
    (Recorder(("week", 1)), "needs a trigger"),
    (Recorder(("epoch", 0)), "needs a trigger"),
    (Recorder(("epoch", True)), "needs a trigger"),
])
def test_a_malformed_extension_is_a_config_error(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_trainer(None, epochs=1, extensions=[bad])
    with pytest.raises(ConfigError, match="list of extensions"):
        tiny_trainer(None, epochs=1, extensions=3)


def _scalars(logdir):
    """{tag: [(step, value), ...]} from the TFRecord event files in ``logdir``."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as fh:
            raw = fh.read()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            ev = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_writer_logs_every_epochs_metrics(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed (pip install tensorboardX)")
    logdir = tmp_path / "tb"
    t = tiny_trainer(tmp_path / "run", epochs=3, extensions=[TensorBoardWriter(str(logdir))])
    t.fit(pictures=False)
    got = _scalars(logdir)
    want = [(row["step"], row["train_neg_elbo"]) for row in t.history]
    assert [s for s, _ in got["fastvae/train_neg_elbo"]] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got["fastvae/train_neg_elbo"]], [v for _, v in want], rtol=1e-6)
    assert len(got["fastvae/test_neg_elbo"]) == 3 and "fastvae/epoch" not in got
