"""Convolutional layers: ``Conv2d``, ``ConvTranspose2d`` and ``Reshape``.

Activations flow between layers as ``(B, H*W*C)`` rows in channels-last
(NHWC) order, which is how images arrive (``(H, W)`` or ``(H, W, C)``
flattened) and what lets a convolution be one GEMM whose output is already
the next layer's input. Weights keep PyTorch's layouts: ``Conv2d.W (F, C, k,
k)`` and ``ConvTranspose2d.W (C_in, C_out, k, k)``, so they compare with
``torch.nn`` without transposes.

Shapes (Dumoulin & Visin 2016, "A guide to convolution arithmetic",
relationships 6 and 14): a convolution maps ``H`` to ``(H + 2p - k) // s + 1``;
the transposed convolution, its adjoint, maps ``H`` to ``(H - 1) s - 2p + k +
op``. Gradients through im2col / col2im: with ``cols = im2col(x)`` and ``pre =
cols W^T + b``, ``dW = dpre^T cols``, ``db = sum dpre``, ``dx = col2im(dpre
W)``; the transposed convolution swaps the roles (forward ``col2im(x W)``,
backward ``im2col``).

Algorithms: ``im2col`` (the column buffer and one GEMM per pass, every
backend) or ``direct`` (the backend's :meth:`~fastvae.backends.base.Backend.conv_direct`
and its adjoint and weight gradient, which read the image in place), chosen
per layer, batch size and backend by :meth:`~fastvae.backends.base.Backend.conv_algorithm`
when its workspace is made (on the Numba backend: measured once, cached).
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import Layer, State, uniform_init


def _np_random(shape):
    """Uniform [0, 1) float64 host values of ``shape`` (a fixed seed): the images an algorithm trial runs on."""
    return np.random.default_rng(0).random(shape)


def conv_out(n: int, k: int, s: int, p: int) -> int:
    """Output size of a convolution along one axis (floor((n + 2p - k) / s) + 1)."""
    return (n + 2 * p - k) // s + 1


def conv_transpose_out(n: int, k: int, s: int, p: int, op: int) -> int:
    """Output size of a transposed convolution along one axis ((n - 1) s - 2p + k + op)."""
    return (n - 1) * s - 2 * p + k + op


class _ConvBase(Layer):
    @staticmethod
    def _image(spec, hwc):
        if hwc is None:
            raise ConfigError(f"layer {spec['name']!r} ({spec['type']}) needs an image: give image_shape, or put "
                              "a reshape layer before it")
        return hwc

    def label(self) -> str:
        H, W, C = self.out_hwc
        return f"{C}x{H}x{W}" + ("" if self.activation == "identity" else f"({self.activation})")

    def __init__(self, name, in_hwc, channels, kernel, stride, padding, activation, slope, alpha):
        self.name, self.in_hwc = name, tuple(in_hwc)
        self.channels, self.k, self.s, self.p = channels, kernel, stride, padding
        self.activation, self.slope, self.alpha = activation, slope, alpha
        self.in_features = math.prod(self.in_hwc)

    def bind(self, layout, params, grads):
        self.W, self.dW = layout.view(params, self.name + ".W"), layout.view(grads, self.name + ".W")
        self.b, self.db = layout.view(params, self.name + ".b"), layout.view(grads, self.name + ".b")

    #: the batch an algorithm trial runs at, at most: the algorithms' costs grow alike with the batch
    TRIAL_BATCH = 64

    def _algorithm(self, be, B, need_dx) -> str:
        """This layer's algorithm at batch ``B`` on ``be``: the backend's
        choice among its algorithms (:meth:`~fastvae.backends.base.Backend.conv_algorithm`),
        each tried, only when the choice is not cached, on random images (a
        batch of at most :data:`TRIAL_BATCH`) through this layer's own forward
        and backward, which write only its gradient (every step overwrites it)."""
        if len(be.conv_algorithms) < 2:
            return "im2col"
        H, W, C = self.in_hwc
        n = min(B, self.TRIAL_BATCH)
        sig = (f"{self.spec_type} {H}x{W}x{C} k{self.k} s{self.s} p{self.p} -> {'x'.join(map(str, self.out_hwc))} "
               f"B{n} dx{int(need_dx)} {be.dtype}")
        made = {}

        def trial(algo):
            def run():
                if algo not in made:            # the buffers of a trial, made when it first runs
                    made[algo] = (self._workspace_for(be, n, need_dx, algo), be.empty((n, self.out_features)))
                    made.setdefault("x", be.asarray(_np_random((n, self.in_features))))
                    made.setdefault("dy", be.asarray(_np_random((n, self.out_features))))
                st, d = made[algo]
                self.forward(be, st, made["x"], None)
                d[...] = made["dy"]
                self.backward(be, st, d, None)
            return run
        return be.conv_algorithm(sig, {a: trial(a) for a in be.conv_algorithms})

    def workspace(self, be, B, need_dx):
        return self._workspace_for(be, B, need_dx, self._algorithm(be, B, need_dx))

    def _out_workspace(self, be, B, need_dx):
        st = State()
        st.pre = be.empty((B, self.out_features))
        st.y = st.pre if self.activation == "identity" else be.empty((B, self.out_features))
        st.dx = be.empty((B, self.in_features)) if need_dx else None
        return st

    def _bias_act(self, be, st):
        F = self.out_hwc[2]
        be.bias_act(None if st.y is st.pre else st.view("y", st.y, -1, F), st.view("pre", st.pre, -1, F), self.b,
                    self.activation, self.slope, self.alpha)

    def _act_backward(self, be, st, dy):
        F = self.out_hwc[2]
        d = st.view("dy", dy, -1, F)
        if self.activation != "identity":
            be.act_backward(d, st.view("pre", st.pre, -1, F), st.view("y", st.y, -1, F), self.activation, self.slope,
                            self.alpha)
        be.col_sum(self.db, d)
        return d


    def torch_forward(self, twin, mod, h):
        return twin.acts[self.activation](mod(twin.nchw(h, self.in_hwc)))

    def torch_tensors(self, mod):
        return [(self.name + ".W", mod.weight, slice(None)), (self.name + ".b", mod.bias, slice(None))]


class Conv2d(_ConvBase):
    """``y = act(conv2d(x, W, stride, padding) + b)`` on ``x (B, H*W*C)``
    channels-last; ``W (F, C, k, k)``, ``b (F,)``, ``y (B, Ho*Wo*F)``."""

    spec_type = "conv2d"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        return cls(spec["name"], cls._image(spec, hwc), spec["channels"], spec["kernel"], spec["stride"],
                   spec["padding"], spec["activation"], ctx.leaky_slope, ctx.elu_alpha)

    def __init__(self, name, in_hwc, channels, kernel, stride=1, padding=0, activation="identity",
                 slope=0.01, alpha=1.0):
        super().__init__(name, in_hwc, channels, kernel, stride, padding, activation, slope, alpha)
        H, W, _ = self.in_hwc
        Ho, Wo = conv_out(H, kernel, stride, padding), conv_out(W, kernel, stride, padding)
        if Ho < 1 or Wo < 1:
            raise ConfigError(f"layer {name!r}: a {kernel}x{kernel} convolution (stride {stride}, padding "
                              f"{padding}) does not fit its {H}x{W} input; use a smaller kernel or more padding")
        self.out_hwc = (Ho, Wo, channels)
        self.out_features = Ho * Wo * channels

    def torch_module(self, twin):
        return twin.nn.Conv2d(self.in_hwc[2], self.channels, self.k, self.s, self.p)

    def param_entries(self):
        C = self.in_hwc[2]
        return [(self.name + ".W", (self.channels, C, self.k, self.k)), (self.name + ".b", (self.channels,))]

    def init_params(self, host, layout, rng, scheme):
        """torch ``nn.Conv2d`` default: fan_in = C k k (Xavier: fan_out = F k k)."""
        w, b = layout.view(host, self.name + ".W"), layout.view(host, self.name + ".b")
        kk = self.k * self.k
        uniform_init(w, b, rng, scheme, self.in_hwc[2] * kk, self.channels * kk)

    @property
    def cols_per_image(self) -> int:
        """Elements of the im2col buffer per image: ``Ho Wo x Cin k k``."""
        return self.out_hwc[0] * self.out_hwc[1] * self.in_hwc[2] * self.k * self.k

    def _workspace_for(self, be, B, need_dx, algo):
        st = self._out_workspace(be, B, need_dx)
        st.algo = algo
        Ho, Wo, _ = self.out_hwc
        st.cols = be.empty((B * Ho * Wo, self.in_hwc[2] * self.k * self.k)) if algo == "im2col" else None
        return st

    def forward(self, be, st, x, step):
        """``cols = im2col(x)``; ``pre = cols W^T`` (one GEMM, already channels-last); bias + act.
        Direct: ``pre = conv_direct(x, W)``."""
        st.x = x
        if st.algo == "direct":
            be.conv_direct(st.pre, x, self.W, self.in_hwc, self.k, self.s, self.p, self.out_hwc[:2])
            self._bias_act(be, st)
            return st.y
        be.im2col(st.cols, x, self.in_hwc, self.k, self.s, self.p, self.out_hwc[:2])
        F = self.channels
        be.gemm(st.view("pre", st.pre, -1, F), st.cols, st.view("W", self.W, F, -1), trans_b=True)
        self._bias_act(be, st)
        return st.y

    def backward(self, be, st, dy, step):
        """``dW = dpre^T cols``, ``db = sum dpre``, ``dx = col2im(dpre W)`` (the
        column buffer is reused for ``dcols`` once dW is done)."""
        F = self.channels
        d = self._act_backward(be, st, dy)
        if st.algo == "direct":                     # dy now holds dpre
            be.conv_direct_dw(self.dW, st.x, dy, self.in_hwc, self.k, self.s, self.p, self.out_hwc[:2])
            if st.dx is None:
                return None
            return be.conv_direct_dx(st.dx, dy, self.W, self.in_hwc, self.k, self.s, self.p, self.out_hwc[:2])
        be.gemm(st.view("dW", self.dW, F, -1), d, st.cols, trans_a=True)
        if st.dx is None:
            return None
        be.gemm(st.cols, d, st.view("W", self.W, F, -1))
        be.col2im(st.dx, st.cols, self.in_hwc, self.k, self.s, self.p, self.out_hwc[:2])
        return st.dx


class ConvTranspose2d(_ConvBase):
    """``y = act(conv_transpose2d(x, W, stride, padding, output_padding) + b)``
    on ``x (B, H*W*C_in)`` channels-last; ``W (C_in, C_out, k, k)``, ``b
    (C_out,)``, ``y (B, Ho*Wo*C_out)``: the adjoint of a convolution from
    ``(Ho, Wo, C_out)`` to ``(H, W, C_in)``."""

    spec_type = "conv_transpose2d"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        return cls(spec["name"], cls._image(spec, hwc), spec["channels"], spec["kernel"], spec["stride"],
                   spec["padding"], spec["output_padding"], spec["activation"], ctx.leaky_slope, ctx.elu_alpha)

    def __init__(self, name, in_hwc, channels, kernel, stride=1, padding=0, output_padding=0,
                 activation="identity", slope=0.01, alpha=1.0):
        super().__init__(name, in_hwc, channels, kernel, stride, padding, activation, slope, alpha)
        if not 0 <= output_padding < max(stride, 1):
            raise ConfigError(f"layer {name!r}: output_padding {output_padding} must be below the stride {stride}")
        H, W, _ = self.in_hwc
        Ho = conv_transpose_out(H, kernel, stride, padding, output_padding)
        Wo = conv_transpose_out(W, kernel, stride, padding, output_padding)
        if Ho < 1 or Wo < 1:
            raise ConfigError(f"layer {name!r}: padding {padding} leaves no output from a {H}x{W} input")
        self.op = output_padding
        self.out_hwc = (Ho, Wo, channels)
        self.out_features = Ho * Wo * channels

    def torch_module(self, twin):
        return twin.nn.ConvTranspose2d(self.in_hwc[2], self.channels, self.k, self.s, self.p, self.op)

    def param_entries(self):
        C = self.in_hwc[2]
        return [(self.name + ".W", (C, self.channels, self.k, self.k)), (self.name + ".b", (self.channels,))]

    def init_params(self, host, layout, rng, scheme):
        """torch ``nn.ConvTranspose2d`` default: torch takes fan_in from weight
        dimension 1, i.e. C_out k k (Xavier: fan_out = C_in k k)."""
        w, b = layout.view(host, self.name + ".W"), layout.view(host, self.name + ".b")
        kk = self.k * self.k
        uniform_init(w, b, rng, scheme, self.channels * kk, self.in_hwc[2] * kk)

    @property
    def cols_per_image(self) -> int:
        """Elements of the column buffer per image: ``H W x Cout k k``."""
        return self.in_hwc[0] * self.in_hwc[1] * self.channels * self.k * self.k

    def _workspace_for(self, be, B, need_dx, algo):
        st = self._out_workspace(be, B, need_dx)
        st.algo = algo
        H, W, _ = self.in_hwc
        st.cols = be.empty((B * H * W, self.channels * self.k * self.k)) if algo == "im2col" else None
        return st

    def forward(self, be, st, x, step):
        """``cols = x W`` (one GEMM), ``pre = col2im(cols)``; bias + act.
        Direct: ``pre = conv_direct_dx(x, W)`` (the adjoint convolution's input gradient)."""
        Cin = self.in_hwc[2]
        st.x = x
        if st.algo == "direct":
            be.conv_direct_dx(st.pre, x, self.W, self.out_hwc, self.k, self.s, self.p, self.in_hwc[:2])
            self._bias_act(be, st)
            return st.y
        be.gemm(st.cols, st.view("x", x, -1, Cin), st.view("W", self.W, Cin, -1))
        be.col2im(st.pre, st.cols, self.out_hwc, self.k, self.s, self.p, self.in_hwc[:2])
        self._bias_act(be, st)
        return st.y

    def backward(self, be, st, dy, step):
        """``dcols = im2col(dpre)``, ``dW = x^T dcols``, ``dx = dcols W^T``."""
        Cin = self.in_hwc[2]
        d = self._act_backward(be, st, dy)
        if st.algo == "direct":                     # dy now holds dpre, the adjoint convolution's input
            be.conv_direct_dw(self.dW, dy, st.x, self.out_hwc, self.k, self.s, self.p, self.in_hwc[:2])
            if st.dx is None:
                return None
            return be.conv_direct(st.dx, dy, self.W, self.out_hwc, self.k, self.s, self.p, self.in_hwc[:2])
        be.im2col(st.cols, st.view("dpre", d, dy.shape[0], -1), self.out_hwc, self.k, self.s, self.p, self.in_hwc[:2])
        be.gemm(st.view("dW", self.dW, Cin, -1), st.view("x", st.x, -1, Cin), st.cols, trans_a=True)
        if st.dx is None:
            return None
        be.gemm(st.view("dx", st.dx, -1, Cin), st.cols, st.view("W", self.W, Cin, -1), trans_b=True)
        return st.dx


class Reshape(Layer):
    """Reinterpret ``(B, n)`` rows as an image of ``(C, H, W)`` (the spec's
    PyTorch order; stored channels-last) or back to flat: no data moves."""

    spec_type = "reshape"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        C, H, W = spec["shape"]
        return cls(spec["name"], n, (H, W, C))

    def label(self) -> str:
        H, W, C = self.out_hwc
        return f"[{C}x{H}x{W}]"

    def __init__(self, name, in_features, hwc):
        if math.prod(hwc) != in_features:
            raise ConfigError(f"layer {name!r} reshapes {in_features} values into {hwc[2]}x{hwc[0]}x{hwc[1]} "
                              f"= {math.prod(hwc)}; make the layer before it output {math.prod(hwc)}")
        self.name, self.in_features, self.out_features = name, in_features, in_features
        self.out_hwc = tuple(hwc)

    def workspace(self, be, B, need_dx):
        st = State()
        st.y = None
        return st

    def forward(self, be, st, x, step):
        st.y = x
        return x

    def backward(self, be, st, dy, step):
        return dy

    def torch_forward(self, twin, mod, h):
        return twin.nchw(twin.rows(h), self.out_hwc)
