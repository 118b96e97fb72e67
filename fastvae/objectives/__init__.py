"""Training objectives, one protocol: ``elbo`` (the beta-weighted ELBO),
``iwae`` (the importance-weighted bound, Burda et al. 2016) and ``btcvae``
(beta-TCVAE, Chen et al. 2018). :func:`make` builds the one a
:class:`~fastvae.config.TrainConfig` names.

An objective has ``name`` and:

* ``train_step(ws, rng, beta, grad_scale, need_loss)``: the loss and every
  gradient (into ``model.grads``) of the batch in workspace ``ws``; draws any
  noise of its own from the training stream ``rng``; returns device
  ``(recon_sum, kl_sum)`` over the batch's images in nats (an IWAE bound puts
  ``-L_K`` in the first slot, 0 in the second), or ``(None, None)`` when
  ``need_loss`` is False;
* ``idle_step(rng, n)``: a data-parallel rank's step on an empty shard of a
  global batch of ``n`` images (the same draws as the other ranks);
* ``weighted_loss(recon, kl, beta)``: the objective's loss sum from those two;
* ``set_time(epoch)``: the time of the next step (epochs, float), for
  weights that follow a schedule of the objective's own.

Adding an objective: one class of this protocol in a module here, and its
name in :func:`make` (and in ``TrainConfig.objective``'s choices). May import:
fastvae.nn, fastvae.backends, fastvae.errors, fastvae.naming, fastvae.checks.
"""

from __future__ import annotations

from fastvae.errors import ConfigError
from fastvae.naming import option
from fastvae.objectives.btcvae import BetaTCVAEObjective
from fastvae.objectives.elbo import ELBOObjective
from fastvae.objectives.iwae import IWAEObjective


def train_rows(train_config) -> int:
    """Work-buffer rows one training step takes: the batch, and for IWAE also
    its K samples of each image (workspaces of B and B K rows)."""
    B = train_config.batch_size
    return B * (1 + train_config.iwae_k) if train_config.objective == "iwae" else B


def make(train_config, model, n_train: int, comm=None):
    """The objective a :class:`~fastvae.config.TrainConfig` names: an
    :class:`ELBOObjective`, :class:`IWAEObjective` or
    :class:`BetaTCVAEObjective` (``n_train``: training images, the dataset
    size beta-TCVAE's estimator needs; ``comm``: the data-parallel
    :class:`fastvae.training.distributed.World`, None for one process).
    ConfigError for beta-TCVAE on a flow posterior or a batch of one."""
    if train_config.objective == "btcvae" and model.decoder_at != model.sampler_at + 1:
        raise ConfigError(f"{option('objective', 'btcvae')} is written for the Gaussian posterior; train an IAF "
                          f"posterior ({option('posterior', 'iaf')}) with the ELBO or IWAE, or drop the flows")
    if train_config.objective == "iwae":
        return IWAEObjective(model, train_config.iwae_k)
    if train_config.objective == "btcvae":
        if train_config.batch_size < 2:       # its TC term: the constant (L - 1) log N, no gradient
            raise ConfigError(f"{option('objective', 'btcvae')} estimates log q(z) from the other images of a batch, "
                              "and a batch of 1 has none (beta would weigh a constant); use "
                              f"{option('batch_size', 2)} or more (64+ is usual)")
        return BetaTCVAEObjective(model, n_train, comm, estimator=train_config.tc_estimator,
                                  dwkl_warmup=train_config.dwkl_warmup)
    return ELBOObjective(model)


__all__ = ["ELBOObjective", "IWAEObjective", "BetaTCVAEObjective", "make", "train_rows"]
