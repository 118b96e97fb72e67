"""Adam over the one flat parameter buffer (adam) and the per-step beta and learning-rate schedules.

May import: fastvae.errors, fastvae.naming, fastvae.checks, fastvae.backends.
"""
