"""The fully connected layer."""

from __future__ import annotations

from fastvae.nn.layers.base import Layer, State, uniform_init


class Dense(Layer):
    """Fully connected layer with its activation: ``y = act(x W^T + b)``.

    W: ``(out, in)``, b: ``(out,)`` (PyTorch's ``nn.Linear`` convention, so
    weights compare with a torch twin without transposes); x: ``(B, in)``,
    y: ``(B, out)`` in the model dtype. ``parts`` stores the one GEMM's rows
    as several named tensors, back to back (all weights, then all biases):
    the encoder's ``mu | logvar`` head is one ``(2L, H)`` GEMM whose halves
    keep their names ``encoder.mu.W`` and ``encoder.logvar.W``.
    """

    spec_type = "dense"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        return cls(spec["name"], n, spec["units"], spec["activation"], spec.get("parts"), ctx.leaky_slope,
                   ctx.elu_alpha)

    def __init__(self, name, in_features, out_features, activation, parts=None, slope=0.01, alpha=1.0):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.activation, self.slope, self.alpha = activation, slope, alpha
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        self.tensors = [prefix + p for p in parts] if parts else [name]

    def param_entries(self):
        rows = self.out_features // len(self.tensors)
        return ([(t + ".W", (rows, self.in_features)) for t in self.tensors]
                + [(t + ".b", (rows,)) for t in self.tensors])

    def bind(self, layout, params, grads):
        first_w, first_b = self.tensors[0] + ".W", self.tensors[0] + ".b"
        w_shape = (self.out_features, self.in_features)
        self.W, self.dW = layout.span(params, first_w, w_shape), layout.span(grads, first_w, w_shape)
        self.b, self.db = layout.span(params, first_b, (self.out_features,)), layout.span(grads, first_b, (self.out_features,))

    def init_params(self, host, layout, rng, scheme):
        """``pytorch``: W, b ~ U(-k, k), k = 1/sqrt(fan_in) (``nn.Linear``'s
        default, kaiming_uniform with a = sqrt(5)); ``xavier``: W ~ U(-a, a),
        a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16), b = 0.
        Each part is initialised as a layer of its own (W, then b)."""
        for t in self.tensors:
            w, b = layout.view(host, t + ".W"), layout.view(host, t + ".b")
            uniform_init(w, b, rng, scheme, self.in_features, w.shape[0])

    def workspace(self, be, B, need_dx):
        st = State()
        st.pre = be.empty((B, self.out_features))            # x W^T + b, kept for act'
        st.y = st.pre if self.activation == "identity" else be.empty((B, self.out_features))
        st.dx = be.empty((B, self.in_features)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        """``pre = x W^T + b`` (one GEMM, then the bias fused with the
        activation); returns ``y = act(pre)``, ``(B, out)``."""
        return self._forward(be, st, x, self.W)

    def backward(self, be, st, dy, step):
        """In place ``dy *= act'(pre)`` (now dLoss/dpre), then
        ``dW = dpre^T x``, ``db = sum_i dpre_i`` and ``dx = dpre W``."""
        return self._backward(be, st, dy, self.W)

    def _forward(self, be, st, x, W):
        st.x = x
        be.gemm(st.pre, x, W, trans_b=True)
        be.bias_act(None if st.y is st.pre else st.y, st.pre, self.b, self.activation, self.slope, self.alpha)
        return st.y

    def _backward(self, be, st, dy, W):
        if self.activation != "identity":
            be.act_backward(dy, st.pre, st.y, self.activation, self.slope, self.alpha)
        be.gemm(self.dW, dy, st.x, trans_a=True)
        be.col_sum(self.db, dy)
        if st.dx is None:
            return None
        be.gemm(st.dx, dy, W)
        return st.dx


    def torch_module(self, twin):
        return twin.nn.Linear(self.in_features, self.out_features)

    def torch_forward(self, twin, mod, h):
        return twin.acts[self.activation](mod(twin.rows(h)))

    def torch_tensors(self, mod):
        """One torch Linear; a layer stored in parts (the ``mu | logvar`` head) splits its rows."""
        r, out = self.out_features // len(self.tensors), []
        for i, t in enumerate(self.tensors):
            rows = slice(i * r, (i + 1) * r)
            out += [(t + ".W", mod.weight, rows), (t + ".b", mod.bias, rows)]
        return out


class MaskedDense(Dense):
    """A dense layer with a fixed 0/1 ``mask (out, in)`` on its weight (MADE,
    Germain et al. 2015, eq. 9): ``y = act(x (W * mask)^T + b)``, and the mask
    also applies to the gradient, ``dW = (dpre^T x) * mask``, so masked
    entries never move and never act, whatever values a file gives them.
    ``dx = dpre (W * mask)``. The mask is host data fixed by the architecture
    (not a parameter, not in checkpoints): an array, or a function that makes
    it when first needed (an IAF step's masks are as large as its weights, so
    they wait for the model's memory check, never allocated while a spec is
    only being checked)."""

    spec_type = ""                  # inside an IAF step only, never named by a spec

    def __init__(self, name, in_features, out_features, activation, mask, parts=None, slope=0.01, alpha=1.0):
        super().__init__(name, in_features, out_features, activation, parts, slope, alpha)
        self._mask = mask

    @property
    def mask(self):
        """The ``(out, in)`` 0/1 mask (made on first use when given as a function)."""
        if callable(self._mask):
            self._mask = self._mask()
        if self._mask.shape != (self.out_features, self.in_features):
            raise ValueError(f"mask of shape {self._mask.shape} for a {self.out_features} x {self.in_features} weight")
        return self._mask

    def workspace(self, be, B, need_dx):
        st = super().workspace(be, B, need_dx)
        st.mask = be.asarray(self.mask)
        st.Wm = be.empty(self.mask.shape)
        return st

    def forward(self, be, st, x, step):
        """``y = act(x (W * mask)^T + b)``."""
        return self._forward(be, st, x, be.mul_(st.Wm, self.W, st.mask))

    def backward(self, be, st, dy, step):
        """As :meth:`Dense.backward` with ``W * mask``, then ``dW *= mask``."""
        dx = self._backward(be, st, dy, st.Wm)
        be.mul_(self.dW, self.dW, st.mask)
        return dx
