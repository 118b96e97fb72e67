"""Long runs, excluded from the default test run (``pytest -m slow``)."""

import numpy as np
import pytest

from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, datasets

from conftest import MNIST_DIR, needs_mnist


@pytest.mark.slow
@needs_mnist
def test_fifty_epochs_of_mnist_hold_steady_memory(tmp_path):
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=MNIST_DIR, download=False))
    t = Trainer(ModelConfig(input_dim=784, hidden=[400], latent_dim=20, image_shape=(28, 28)),
                TrainConfig(epochs=50, batch_size=128), DataConfig(dataset="mnist",
                                                                                   data_dir=MNIST_DIR),
                dataset=ds, out=str(tmp_path), progress=False)
    hist = t.fit(pictures=False)
    rss = np.array([h["rss_mb"] for h in hist])
    print("\nresident memory per epoch (MiB):", " ".join(f"{v:.0f}" for v in rss))
    # after the first epochs (buffers, caches) the footprint must not grow: < 20 MiB drift
    assert rss[5:].max() - rss[5] < 20, rss
    assert hist[-1]["test_neg_elbo"] < hist[9]["test_neg_elbo"]
