"""The one table of operation codes shared by the config, the Numba kernels
and the CUDA kernels.

Kernels select an activation or a likelihood by a small integer. The codes
are written here once; ``fastvae.kernels.numba_cpu`` reads its constants from
these dicts and the CUDA source receives them as preprocessor defines
(:func:`cuda_defines`, passed to NVRTC by the cupy backend and to ``nvcc`` by
CI: ``nvcc ... $(python -c "from fastvae.nn.opcodes import cuda_defines;
print(*cuda_defines())")``), so the three can never disagree.

Changing a code: also touch ``kernels/numba_cpu.py``. Numba freezes globals
into compiled code and keys its on-disk cache on that file's timestamp only,
so cached kernels would keep the old code (the backend parity tests, which
select kernels by name through this table, would catch it).
"""

from __future__ import annotations

from typing import Dict, List

#: activation name -> kernel code. ``identity`` is used after heads and the
#: decoder's output layer; the others are the hidden-layer choices.
ACTIVATION_CODES: Dict[str, int] = {
    "identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "leaky_relu": 4, "elu": 5, "softplus": 6,
}

#: likelihood name -> kernel code (see Backend.likelihood for the formulas).
LIKELIHOOD_CODES: Dict[str, int] = {"bernoulli": 0, "gaussian": 1, "mse": 2}

#: hidden-layer activations a user may choose (every code but identity).
ACTIVATIONS = tuple(k for k in ACTIVATION_CODES if k != "identity")
LIKELIHOODS = tuple(LIKELIHOOD_CODES)


def cuda_defines() -> List[str]:
    """``-DFV_<NAME>=<code>`` for every activation and likelihood, e.g.
    ``-DFV_RELU=1`` and ``-DFV_BERNOULLI=0``: the compiler options that give
    ``kernels/cuda_kernels.cu`` its op codes (NVRTC and ``nvcc`` alike)."""
    table = {**ACTIVATION_CODES, **LIKELIHOOD_CODES}
    return [f"-DFV_{name.upper()}={code}" for name, code in table.items()]
