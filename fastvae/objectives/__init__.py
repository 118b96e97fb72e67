"""Training objectives beyond the ELBO: the importance-weighted bound (iwae) and beta-TCVAE
(btcvae). The ELBO itself is the model's own loss walk.

May import: fastvae.nn, fastvae.backends, fastvae.errors, fastvae.naming, fastvae.checks.
"""
