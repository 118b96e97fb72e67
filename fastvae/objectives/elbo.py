"""The ELBO as an objective (Kingma & Welling 2014, eq. 10): the model's own
loss walk, ``mean_i(recon_i + beta * kl_i)`` with the Gaussian KL in closed
form (or, with IAF steps, the flow's single-sample log-density terms)."""

from __future__ import annotations


class ELBOObjective:
    """The beta-weighted negative ELBO on ``model`` (a :class:`fastvae.VAE`):
    its forward and reversed backward walk (:meth:`fastvae.VAE.loss_and_grad`)."""

    name = "elbo"

    def __init__(self, model):
        self.model = model

    def train_step(self, ws, rng, beta: float, grad_scale: float, need_loss: bool):
        """Loss and gradient of the batch ``ws`` (a :class:`~fastvae.training.parts.Batch`) (its ``x`` and
        ``eps`` already drawn by the batch source; ``rng`` unused); returns
        the device ``(recon_sum, kl_sum)`` over its images (nats), or
        ``(None, None)`` when ``need_loss`` is False."""
        return self.model.loss_and_grad(ws.x, ws.eps, beta, need_loss=need_loss, grad_scale=grad_scale)

    def idle_step(self, rng, n: int) -> None:
        """A rank's step on an empty shard: the ELBO draws nothing beyond the batch's own noise."""

    def set_time(self, epoch: float) -> None:
        """No weights of its own to schedule."""

    def weighted_loss(self, recon, kl, beta):
        """The loss summed over images: ``recon + beta * kl``."""
        return recon + beta * kl
