"""Numba CPU kernels of the convolutions for the ``numba`` backend: im2col
and its adjoint col2im on channels-last images (the layout and formulas are
documented on :class:`fastvae.backends.base.Backend` and in
:mod:`fastvae.nn.layers.conv`). Pure copies and additions, serial, compiled as
the other kernels (:mod:`.numba_cpu`; ``nogil``, so the backend may run one on
each half of a batch's images from two threads)."""

import numpy as np

from fastvae.kernels.numba_cpu import _jit


@_jit
def _window(off, oh, ow, H, W, C, k, s, p):
    """off[i k + j] = where window pixel (i, j) of output (oh, ow) starts in a
    channels-last image (its first channel), or -1 in the padding."""
    for i in range(k):
        h = oh * s - p + i
        for j in range(k):
            w = ow * s - p + j
            off[i * k + j] = (h * W + w) * C if 0 <= h < H and 0 <= w < W else -1


@_jit
def _gather(row, xb, off, C, kk):
    """row[c kk + q] = xb[off[q] + c], 0 where off[q] < 0 (the padding)."""
    for c in range(C):
        for q in range(kk):
            o = off[q]
            row[c * kk + q] = xb[o + c] if o >= 0 else 0.0


@_jit
def _scatter_add(xb, row, off, C, kk):
    """xb[off[q] + c] += row[c kk + q] where off[q] >= 0 (padding dropped)."""
    for c in range(C):
        for q in range(kk):
            o = off[q]
            if o >= 0:
                xb[o + c] += row[c * kk + q]


@_jit
def im2col(cols, x, B, H, W, C, k, s, p, Ho, Wo):
    """cols[(b, oh, ow), (c, i, j)] = x[b, oh*s - p + i, ow*s - p + j, c] on
    channels-last x (B, H*W*C), 0 in the padding. Pure copies: the window's
    k*k pixel offsets are found once per output position, then each row is
    written in order (c, then i j), reading x at stride C from the window's
    few KB (2.2x faster than the previous loop, which wrote at stride k*k,
    at the seed net's 12x12x128 k6 at B = 128: 2.9 against 6.5 ms; 3.8
    against 8.8 at 64x64x3 k4; bit for bit the same copies)."""
    kk = k * k
    off = np.empty(kk, np.int64)
    for b in range(B):
        xb = x[b]
        for oh in range(Ho):
            for ow in range(Wo):
                row = cols[(b * Ho + oh) * Wo + ow]
                _window(off, oh, ow, H, W, C, k, s, p)
                _gather(row, xb, off, C, kk)


@_jit
def col2im(x, cols, B, H, W, C, k, s, p, Ho, Wo):
    """The adjoint of im2col: x (B, H*W*C) = sum of each column entry at the
    pixel it was read from (padding entries dropped); x is zeroed first. Each
    (oh, ow) adds at most once to a pixel, in (oh, ow) order whatever the
    inner loop order, so the sums are bit for bit those of any order (here
    the row read in order: 3.5 against 7.3 ms at 12x12x128 k6, B = 128; 10%
    slower with one channel, 0.66 against 0.57 at 28x28x1 k6)."""
    kk = k * k
    off = np.empty(kk, np.int64)
    for b in range(B):
        xb = x[b]
        for q in range(H * W * C):
            xb[q] = 0.0
        for oh in range(Ho):
            for ow in range(Wo):
                row = cols[(b * Ho + oh) * Wo + ow]
                _window(off, oh, ow, H, W, C, k, s, p)
                _scatter_add(xb, row, off, C, kk)


@_jit
def _interior(h0, w0, H, W, C, k):
    """Where a k x k window whose first pixel is (h0, w0) starts in a
    channels-last image, or -1 when part of it lies in the padding."""
    if 0 <= h0 and h0 + k <= H and 0 <= w0 and w0 + k <= W:
        return (h0 * W + w0) * C
    return -1


@_jit
def _relative(rel, W, C, k):
    """rel[i k + j] = (i W + j) C: window pixel (i, j) from its first pixel."""
    for i in range(k):
        for j in range(k):
            rel[i * k + j] = (i * W + j) * C


@_jit
def im2col_narrow(cols, x, B, H, W, C, k, s, p, Ho, Wo):
    """:func:`im2col` for images of few channels: a window inside the image
    is read at its first pixel's offset plus a fixed pattern, without the
    per-pixel bounds checks (64x64x1 k4 s2, B = 64: 1.06 against 1.42 ms; at
    32 channels this loop was the slower, 5.7 against 4.8 ms). The same
    copies, bit for bit."""
    kk = k * k
    off, rel = np.empty(kk, np.int64), np.empty(kk, np.int64)
    _relative(rel, W, C, k)
    for b in range(B):
        xb = x[b]
        for oh in range(Ho):
            for ow in range(Wo):
                row = cols[(b * Ho + oh) * Wo + ow]
                base = _interior(oh * s - p, ow * s - p, H, W, C, k)
                if base >= 0:
                    for c in range(C):
                        for q in range(kk):
                            row[c * kk + q] = xb[base + rel[q] + c]
                    continue
                _window(off, oh, ow, H, W, C, k, s, p)
                _gather(row, xb, off, C, kk)


@_jit
def col2im_narrow(x, cols, B, H, W, C, k, s, p, Ho, Wo):
    """:func:`col2im` for images of few channels, windows inside the image
    without bounds checks as in :func:`im2col_narrow` (64x64x1 k4 s2, B = 64:
    1.15 against 2.11 ms). The same additions in the same order, bit for bit."""
    kk = k * k
    off, rel = np.empty(kk, np.int64), np.empty(kk, np.int64)
    _relative(rel, W, C, k)
    for b in range(B):
        xb = x[b]
        for q in range(H * W * C):
            xb[q] = 0.0
        for oh in range(Ho):
            for ow in range(Wo):
                row = cols[(b * Ho + oh) * Wo + ow]
                base = _interior(oh * s - p, ow * s - p, H, W, C, k)
                if base >= 0:
                    for c in range(C):
                        for q in range(kk):
                            xb[base + rel[q] + c] += row[c * kk + q]
                    continue
                _window(off, oh, ow, H, W, C, k, s, p)
                _scatter_add(xb, row, off, C, kk)


# ---- direct convolution on channels-last images: no column buffer ----------------------------------
# Wt holds the weight as (k*k*C, F) rows, Wt[(i*k + j)*C + c, f] = W[f, c, i, j] (PyTorch's (F, C, k, k)),
# so that the innermost loop runs over the F output channels of one pixel, contiguous in y and in Wt.

@_jit
def _taps(base, tap, oh, ow, H, W, C, k, s, p):
    """The taps of output pixel (oh, ow) that fall inside the image, in (i, j)
    order: ``base[t]`` the offset of the pixel read, ``tap[t] = i*k + j``;
    returns their count."""
    n = 0
    for i in range(k):
        ih = oh * s - p + i
        if ih < 0 or ih >= H:
            continue
        for j in range(k):
            iw = ow * s - p + j
            if iw < 0 or iw >= W:
                continue
            base[n] = (ih * W + iw) * C
            tap[n] = i * k + j
            n += 1
    return n


@_jit
def conv_direct(y, x, Wt, B, H, W, C, k, s, p, Ho, Wo, F):
    """y[b, oh, ow, f] = sum_{i, j, c} x[b, oh*s - p + i, ow*s - p + j, c] W[f, c, i, j]
    (no bias), padding read as 0; x (B, H*W*C), y (B, Ho*Wo*F). Each output
    pixel's F sums accumulate in a local row, taps and channels in a fixed
    order (deterministic)."""
    acc = np.empty(F, y.dtype)
    base, tap = np.empty(k * k, np.int64), np.empty(k * k, np.int64)
    for b in range(B):
        xb, yb = x[b], y[b]
        for oh in range(Ho):
            for ow in range(Wo):
                acc[:] = 0
                for t in range(_taps(base, tap, oh, ow, H, W, C, k, s, p)):
                    for c in range(C):
                        xv = xb[base[t] + c]
                        wr = Wt[tap[t] * C + c]
                        for f in range(F):
                            acc[f] += xv * wr[f]
                o = (oh * Wo + ow) * F
                for f in range(F):
                    yb[o + f] = acc[f]


@_jit
def conv_direct_dx(dx, dy, Wd, B, H, W, C, k, s, p, Ho, Wo, F):
    """The adjoint of :func:`conv_direct`: dx[b, ih, iw, c] = sum over the
    output pixels and taps that read it of dy[b, oh, ow, f] W[f, c, i, j];
    ``Wd (k*k*F, C)``, Wd[(i*k + j)*F + f, c] = W[f, c, i, j]. Overwrites dx
    (B, H*W*C); dy (B, Ho*Wo*F). Scatter in a fixed order (deterministic):
    each tap's C sums in a local row, then added to dx."""
    acc = np.empty(C, dx.dtype)
    base, tap = np.empty(k * k, np.int64), np.empty(k * k, np.int64)
    for b in range(B):
        dxb, dyb = dx[b], dy[b]
        dxb[:] = 0
        for oh in range(Ho):
            for ow in range(Wo):
                o = (oh * Wo + ow) * F
                for t in range(_taps(base, tap, oh, ow, H, W, C, k, s, p)):
                    acc[:] = 0
                    for f in range(F):
                        g = dyb[o + f]
                        wr = Wd[tap[t] * F + f]
                        for c in range(C):
                            acc[c] += g * wr[c]
                    for c in range(C):
                        dxb[base[t] + c] += acc[c]


@_jit
def conv_direct_dw(dWt, x, dy, B, H, W, C, k, s, p, Ho, Wo, F):
    """The weight gradient of :func:`conv_direct` in Wt's layout: dWt[(i*k +
    j)*C + c, f] = sum_{b, oh, ow} x[b, ih, iw, c] dy[b, oh, ow, f]
    (overwritten); images, pixels, taps and channels in a fixed order."""
    dWt[:] = 0
    base, tap = np.empty(k * k, np.int64), np.empty(k * k, np.int64)
    for b in range(B):
        xb, dyb = x[b], dy[b]
        for oh in range(Ho):
            for ow in range(Wo):
                o = (oh * Wo + ow) * F
                for t in range(_taps(base, tap, oh, ow, H, W, C, k, s, p)):
                    for c in range(C):
                        xv = xb[base[t] + c]
                        wr = dWt[tap[t] * C + c]
                        for f in range(F):
                            wr[f] += xv * dyb[o + f]
