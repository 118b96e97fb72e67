"""fastvae.kernels: compute kernels only, no model logic.

Installed inside the package as ``fastvae.kernels`` (setup.py ``package_dir``).
Numba ``@njit`` CPU kernels and CUDA C sources (``*.cu``) for the GPU backend
live here; the backends in ``fastvae.backends`` call them.
"""

from fastvae.cache import use_numba_cache

use_numba_cache()           # compiled kernels go to the user cache folder, never into the install
