"""Files a user hands over and the checkpoint format: untrusted reading (safe_files; HDF5 only in a
sandboxed child: untrusted_hdf5), the HDF5 checkpoint (checkpoint, checkpoint_schema) and the one way a
checkpoint becomes a model (restore).

May import: fastvae.errors, fastvae.config, fastvae.naming, fastvae.checks, fastvae.nn, fastvae.backends,
fastvae.training.parts.runfolder (atomic writes). untrusted_hdf5 imports only the standard library and NumPy
(its child loads it by path).
"""
