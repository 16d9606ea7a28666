"""Layers of the ``cnn`` model with hand-written backward passes (``jax.custom_vjp``).

- :func:`local_response_norm`: cross-channel LRN whose backward is two elementwise
  passes and one channel-window sum (autodiff of the power and the window builds
  several more passes).
- :func:`max_pool_3x3_s2`: 3x3/2 max-pool (padding 1) whose backward routes each
  output's gradient to the first maximum of its window in row-major order, exactly
  as XLA's ``select_and_scatter`` does for ``nn.max_pool``, but as nine fused
  masked strided adds instead of ``select_and_scatter`` (slow on XLA:CPU).
- :func:`conv_patches`: a stride-1 NHWC convolution as one matrix product of a
  gathered patch matrix with the kernel, and its backward pass as two more. Under
  ``jax.vmap`` over per-client kernels these are batched matmuls, where
  ``lax.conv_general_dilated`` becomes a grouped convolution (``feature_group_count``
  = clients), which XLA:CPU runs slowly for few input channels or large maps.
- :func:`conv_rows`: a stride-1 NHWC convolution as one matrix product per kernel row
  with that row's width-Toeplitz matrix, over the output rows it reaches only. On the
  4x4x64 maps of the digits model it does 56% of the patch form's multiply-adds and
  writes no patch matrix (1.7x faster than patches for 4 clients x 32 samples).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- LRN
def _channel_window(v, lo: int, hi: int):
    """``out[..., c] = sum_{c' = c - lo}^{c + hi} v[..., c']`` with zeros outside."""
    c = v.shape[-1]
    p = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(lo, hi)])
    return sum(p[..., i:i + c] for i in range(lo + hi + 1))


def _lrn_power(x, size, alpha, beta, k):
    """``(d, d^beta)`` with ``d = k + alpha / size * window(x^2)``; ``beta = 0.75`` as
    ``sqrt(d) * sqrt(sqrt(d))`` (XLA:CPU's ``pow`` is several times slower)."""
    d = k + alpha / size * _channel_window(x * x, size // 2, (size - 1) // 2)
    if beta == 0.75:
        r = jnp.sqrt(d)
        return d, r * jnp.sqrt(r)
    return d, d ** beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def local_response_norm(x, size: int = 4, alpha: float = 0.001 / 9.0, beta: float = 0.75,
                        k: float = 1.0):
    """Cross-channel LRN over NHWC input, PyTorch ``LocalResponseNorm`` semantics.

    ``x_c / d_c^beta`` with ``d_c = k + alpha / size * sum_{c' in [c - size//2,
    c + (size-1)//2]} x_c'^2`` (zero padding at the channel ends). The backward pass keeps
    only ``x`` and computes ``g / d^beta - 2 alpha beta / size * x * W^T(g * x / d^(beta+1))``,
    ``W^T`` the transposed channel window. The output is a division (an "expensive" op
    to XLA), so XLA materializes it instead of recomputing it, and everything before it,
    inside consumers that read each element many times (a conv's patch gather).
    """
    return x / _lrn_power(x, size, alpha, beta, k)[1]


def _lrn_fwd(x, size, alpha, beta, k):
    return local_response_norm(x, size, alpha, beta, k), x


def _lrn_bwd(size, alpha, beta, k, x, g):
    d, t = _lrn_power(x, size, alpha, beta, k)
    back = _channel_window(g * x / (t * d), (size - 1) // 2, size // 2)
    return (g / t - (2.0 * alpha * beta / size) * x * back,)


local_response_norm.defvjp(_lrn_fwd, _lrn_bwd)


# ----------------------------------------------------------------------------- max-pool
def _window_views(x, axis: int):
    """Along ``axis`` (size n), the views ``[v0, v1, v2]`` with ``v_i[a] = x[2a + i - 1]``
    (-inf outside), ``a < (n - 1) // 2 + 1``: tap ``i`` of every 3-wide, stride-2 window
    with padding 1. Built from the even and odd elements, without a padded copy."""
    n = x.shape[axis]
    no = (n - 1) // 2 + 1
    even = jax.lax.slice_in_dim(x, 0, n, 2, axis)
    odd = jax.lax.slice_in_dim(x, 1, n, 2, axis)
    cfg = lambda lo, hi: [(lo, hi, 0) if d == axis % x.ndim else (0, 0, 0) for d in range(x.ndim)]
    ninf = jnp.array(-jnp.inf, x.dtype)
    m = odd.shape[axis]
    return [jax.lax.pad(odd, ninf, cfg(1, no - 1 - m)), even, jax.lax.pad(odd, ninf, cfg(0, no - m))]


def _pool_taps(x):
    """The 9 taps (row-major) of every 3x3/2 window (padding 1), each shaped like the output."""
    return [c for r in _window_views(x, -3) for c in _window_views(r, -2)]


def max_pool_3x3_s2(x):
    """Max-pool 3x3, stride 2, padding 1 on every side (the original's ``MaxPool2d(3, 2, 1)``)
    over NHWC input; equal to ``nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))``
    in value and gradient (on ties the first maximum of a window, row-major, gets it, as in
    XLA's ``select_and_scatter``).

    The forward pass is a max over strided slices, rows then columns (the window max is
    separable); it keeps the int8 index of each window's maximum. The backward pass adds
    the masked output gradient back per parity of the input position (each input row is
    tap 1 of one window, or tap 0 of one and tap 2 of the previous), instead of
    ``select_and_scatter`` (several times slower on XLA:CPU).
    """
    return _max_pool(x, x.shape[-3], x.shape[-2])


def _pool_max(x):
    r = _window_views(x, -3)
    c = _window_views(jnp.maximum(jnp.maximum(r[0], r[1]), r[2]), -2)
    return jnp.maximum(jnp.maximum(c[0], c[1]), c[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, h: int, w: int):
    """:func:`max_pool_3x3_s2` of an input with ``h`` rows and ``w`` columns."""
    return _pool_max(x)


def _pool_fwd(x, h, w):
    y = _pool_max(x)
    idx = jnp.full(y.shape, 8, jnp.int8)
    for t, v in reversed(list(enumerate(_pool_taps(x)))[:-1]):
        idx = jnp.where(v == y, jnp.int8(t), idx)
    return y, idx


def _pool_bwd(h, w, idx, g):
    ho, wo = idx.shape[-3], idx.shape[-2]
    m = [jnp.where(idx == t, g, jnp.zeros((), g.dtype)) for t in range(9)]
    lead = [(0, 0)] * (idx.ndim - 3)
    rows = lambda a, lo: jnp.pad(a, lead + [(lo, 1 - lo), (0, 0), (0, 0)])
    cols = lambda a, lo: jnp.pad(a, lead + [(0, 0), (lo, 1 - lo), (0, 0)])
    # padded row 2a: tap 0 of window a + tap 2 of window a-1; row 2a+1: tap 1 of window a
    r = [[rows(m[j], 0) + rows(m[6 + j], 1) for j in range(3)], [rows(m[3 + j], 0) for j in range(3)]]
    planes = [jnp.stack([cols(re[0], 0) + cols(re[2], 1), cols(re[1], 0)], -2) for re in r]
    full = jnp.stack(planes, -4).reshape(*idx.shape[:-3], 2 * ho + 2, 2 * wo + 2, idx.shape[-1])
    return (full[..., 1:1 + h, 1:1 + w, :],)


_max_pool.defvjp(_pool_fwd, _pool_bwd)


# ----------------------------------------------------------------------------- conv
@functools.lru_cache(maxsize=64)
def _patch_index(h: int, w: int, kh: int, kw: int, pads: tuple) -> np.ndarray:
    """``[Ho*Wo, kh*kw]``: the flat input pixel (``h*w``: a zero row) that kernel tap
    ``(i, j)`` of output pixel ``q`` reads in a stride-1 conv with ``pads`` ((top, bottom),
    (left, right))."""
    (top, bottom), (left, right) = pads
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    qi, qj, i, j = np.meshgrid(np.arange(ho), np.arange(wo), np.arange(kh), np.arange(kw),
                               indexing="ij")
    pi, pj = qi + i - top, qj + j - left
    ok = (pi >= 0) & (pi < h) & (pj >= 0) & (pj < w)
    return np.where(ok, pi * w + pj, h * w).reshape(ho * wo, kh * kw).astype(np.int32)


def _patch_conv(x, k, pads):
    b, h, w, c = x.shape
    kh, kw, _, o = k.shape
    idx = _patch_index(h, w, kh, kw, pads)
    xf = jnp.concatenate([x.reshape(b, h * w, c), jnp.zeros((b, 1, c), x.dtype)], 1)
    cols = xf[:, idx].reshape(-1, kh * kw * c)                   # [B*Ho*Wo, kh*kw*C]
    ho = h + sum(pads[0]) - kh + 1
    return jnp.dot(cols, k.reshape(kh * kw * c, o)).reshape(b, ho, -1, o), cols


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_patches(x, k, pads=((2, 2), (2, 2))):
    """Stride-1 NHWC/HWIO convolution with padding ``pads`` ((top, bottom), (left, right)) as
    one matrix product: the ``[B*Ho*Wo, kh*kw*C]`` patch matrix (a gather of the input
    pixels each kernel tap reads, zeros in the padding) times the ``[kh*kw*C, O]`` kernel.

    Its backward pass is two more products: the kernel gradient ``patches^T @ g`` and the
    input gradient as the same kind of convolution of ``g`` with the flipped, transposed
    kernel (no scatter). Vmapped over per-client kernels every product is a batched
    matmul, where ``lax.conv_general_dilated`` becomes a grouped convolution.
    """
    return _patch_conv(x, k, pads)[0]


def _conv_fwd(x, k, pads):
    return _patch_conv(x, k, pads)[0], (x, k)


def _conv_bwd(pads, res, g):
    x, k = res
    kh, kw, c, o = k.shape
    cols = _patch_conv(x, k, pads)[1]
    dk = jnp.dot(cols.T, g.reshape(-1, o)).reshape(k.shape)
    (top, bottom), (left, right) = pads
    back = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    dx = _patch_conv(g, jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2), back)[0]
    return dx, dk


conv_patches.defvjp(_conv_fwd, _conv_bwd)


# ----------------------------------------------------------------------------- row-Toeplitz conv
@functools.lru_cache(maxsize=64)
def _tap_index(w: int, wo: int, kw: int, left: int) -> np.ndarray:
    """``[W, Wo]``: the kernel column that input column ``pj`` feeds output column ``qj``
    through (``kw``: none, a zero block)."""
    pj, qj = np.meshgrid(np.arange(w), np.arange(wo), indexing="ij")
    t = pj - qj + left
    return np.where((t >= 0) & (t < kw), t, kw).astype(np.int32)


def _row_spans(h: int, ho: int, kh: int, top: int) -> list[tuple[int, int, int]]:
    """``(i, lo, hi)``: kernel row ``i`` reaches output rows ``lo..hi-1`` (input rows
    ``lo+i-top..``); kernel rows that reach none are left out."""
    spans = [(i, max(0, top - i), min(ho, h + top - i)) for i in range(kh)]
    return [s for s in spans if s[2] > s[1]]


def _row_toeplitz(k, w: int, wo: int, left: int):
    """``[kh, C*W, Wo*O]``: for each kernel row, the matrix of its 1-D convolution along
    the width (rows ``(c, pj)``, columns ``(qj, o)``)."""
    kh, kw, c, o = k.shape
    kz = jnp.concatenate([k, jnp.zeros((kh, 1, c, o), k.dtype)], 1).transpose(0, 2, 1, 3)
    return kz[:, :, _tap_index(w, wo, kw, left), :].reshape(kh, c * w, wo * o)


def _rows_fwd(x, k, pads):
    (top, bottom), (left, right) = pads
    b, h, w, c = x.shape
    kh, kw, _, o = k.shape
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    xr = x.transpose(0, 1, 3, 2).reshape(b, h, c * w)               # rows as (c, pj) vectors
    t = _row_toeplitz(k, w, wo, left)
    y = 0.0
    for i, lo, hi in _row_spans(h, ho, kh, top):
        part = jnp.dot(xr[:, lo + i - top:hi + i - top], t[i])
        y = y + jnp.pad(part, ((0, 0), (lo, ho - hi), (0, 0)))
    return y.reshape(b, ho, wo, o), (xr, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_rows(x, k, pads=((2, 2), (2, 2))):
    """Stride-1 NHWC/HWIO convolution as one matrix product per kernel row: the input
    rows it reaches times that kernel row's width-Toeplitz matrix ``[C*W, Wo*O]``.

    Only the output rows a kernel row reaches are computed, so on a small map it does
    far fewer multiply-adds than patches (5x5 "same" on 4x4: 14 of 25 row products,
    56% of the patch matrix's), and nothing as large as a patch matrix is written.
    The backward pass is the transposed products plus the kernel gradient gathered
    back from the Toeplitz blocks.
    """
    return _rows_fwd(x, k, pads)[0]


def _rows_bwd(pads, res, g):
    xr, k = res
    (top, _), (left, _) = pads
    b, ho, wo, o = g.shape
    kh, kw, c, _ = k.shape
    h, cw, wo_o = xr.shape[1], xr.shape[2], wo * o
    w = cw // c
    t = _row_toeplitz(k, w, wo, left)          # rebuilt: cheaper than keeping it for the backward pass
    gr = g.reshape(b, ho, wo_o)
    dx, dt = 0.0, [jnp.zeros((cw, wo_o), t.dtype)] * kh
    for i, lo, hi in _row_spans(h, ho, kh, top):
        xs, gs = xr[:, lo + i - top:hi + i - top], gr[:, lo:hi]
        dt[i] = jnp.einsum("bri,brj->ij", xs, gs)
        dx = dx + jnp.pad(jnp.dot(gs, t[i].T), ((0, 0), (lo + i - top, h - (hi + i - top)), (0, 0)))
    onehot = jax.nn.one_hot(_tap_index(w, wo, kw, left), kw + 1, dtype=t.dtype)   # [W, Wo, kw+1]
    dk = jnp.einsum("icpqo,pqt->itco", jnp.stack(dt).reshape(kh, c, w, wo, o), onehot)[:, :kw]
    return dx.reshape(b, h, c, w).transpose(0, 1, 3, 2), dk.astype(k.dtype)


conv_rows.defvjp(_rows_fwd, _rows_bwd)
