"""Independent float64 numpy references for the one-shot algorithms.

Written from the papers' formulas, without calling the library:

- SparseGPT row by row, with the inverse Hessian of the remaining rows taken
  by ``np.linalg.inv`` at every step (no Cholesky factor, no lazy batches);
- AWQ with the output error computed from the layer outputs themselves
  (``x @ w``), not from a Gram matrix;
- rankings by ``np.lexsort`` (value descending, then index), not by top-k.
"""

import numpy as np


def keep_count(sparsity, size):
  return int(np.round((1.0 - sparsity) * size))


def keep_topk(scores, k):
  """Bool mask keeping the k largest of ``scores`` (any shape); ties to the lower flat index."""
  s = np.asarray(scores, np.float64).ravel()
  order = np.lexsort((np.arange(s.size), -s))
  keep = np.zeros(s.size, bool)
  keep[order[:k]] = True
  return keep.reshape(np.shape(scores))


def nm_keep(scores, n, m):
  """In each column, keep the n largest of every m consecutive rows."""
  s = np.asarray(scores, np.float64)
  keep = np.zeros(s.shape, bool)
  for col in range(s.shape[1]):
    for start in range(0, s.shape[0], m):
      keep[start : start + m, col] = keep_topk(s[start : start + m, col], n)
  return keep


def magnitude(w, sparsity=None, n_m=None):
  w = np.asarray(w, np.float64)
  score = np.abs(w)
  mask = nm_keep(score, *n_m) if n_m else keep_topk(score, keep_count(sparsity, w.size))
  return np.where(mask, w, 0.0), mask


def wanda(w, x, sparsity=None, n_m=None):
  w = np.asarray(w, np.float64)
  x2 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  norms = np.sqrt((x2**2).sum(axis=0))
  score = np.abs(w) * norms[:, None]
  if n_m:
    mask = nm_keep(score, *n_m)
  else:
    k = keep_count(sparsity, w.shape[0])
    mask = np.stack([keep_topk(score[:, c], k) for c in range(w.shape[1])], axis=1)
  return np.where(mask, w, 0.0), mask


# --------------------------------------------------------------------------
# Round to nearest on an integer grid (float64).
# --------------------------------------------------------------------------


def grid(bits):
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_zp(block, bits, symmetric, axis=0, shrink=1.0):
  """Scale and zero point shared by the entries of ``block`` along ``axis`` (keepdims).

  Symmetric: absmax / qmax. Asymmetric: the range [min, max] widened to hold 0,
  over qmax - qmin, with zero point round(qmin - lo / scale). An empty range
  gives the scale of the range 1. ``shrink`` multiplies the range (clipping).
  """
  qmin, qmax = grid(bits)
  b = np.asarray(block, np.float64)
  if symmetric:
    r = np.abs(b).max(axis=axis, keepdims=True) * shrink
    r = np.where(r > 0, r, 1.0)
    return r / qmax, np.zeros_like(r)
  lo = np.minimum(b.min(axis=axis, keepdims=True), 0.0) * shrink
  hi = np.maximum(b.max(axis=axis, keepdims=True), 0.0) * shrink
  span = np.where(hi - lo > 0, hi - lo, 1.0)
  scale = span / (qmax - qmin)
  zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
  return scale, zp


def fake_quant(v, scale, zp, bits):
  qmin, qmax = grid(bits)
  q = np.clip(np.round(np.asarray(v, np.float64) / scale + zp), qmin, qmax)
  return (q - zp) * scale


def rtn(w, bits, symmetric, group=None, shrink=1.0):
  """Group-wise (``group`` input rows per scale; None: per output) round to nearest."""
  w = np.asarray(w, np.float64)
  group = group or w.shape[0]
  out = np.empty_like(w)
  for g0 in range(0, w.shape[0], group):
    blk = w[g0 : g0 + group]
    s, z = scale_zp(blk, bits, symmetric, shrink=shrink if np.ndim(shrink) == 0 else shrink[g0 // group])
    out[g0 : g0 + group] = fake_quant(blk, s, z, bits)
  return out


# --------------------------------------------------------------------------
# SparseGPT.
# --------------------------------------------------------------------------


def hessian(x, n_in):
  x2 = np.asarray(x, np.float64).reshape(-1, n_in)
  return 2.0 * x2.T @ x2 / x2.shape[0]


def sparsegpt(w, x, sparsity=None, n_m=None, block=128, damp=0.01, bits=None, group=None,
              symmetric=True, per_tensor=False):
  """SparseGPT, one row at a time, with explicit inverses of the remaining Hessian.

  For row i (rows i.. remaining), ``Hinv = inv(H[i:, i:])``; the saliency of a
  weight of row j is ``w_j^2 / inv(H[j:, j:])[0, 0]``; visiting row i sets it
  to ``q_i`` and moves the rows below by the OBS update
  ``-(w_i - q_i) * Hinv[0, 1:] / Hinv[0, 0]``.
  """
  w = np.array(w, np.float64)
  n_in, n_out = w.shape
  h = hessian(x, n_in)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h = h + damp * np.mean(np.diag(h)) * np.eye(n_in)
  d2 = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(n_in)])

  if bits is not None and group is None:
    if per_tensor:
      s, z = scale_zp(w.reshape(-1, 1), bits, symmetric)
      s, z = s.reshape(1, 1), z.reshape(1, 1)
    else:
      s, z = scale_zp(w, bits, symmetric)
  q = np.zeros_like(w)
  mask = np.zeros(w.shape, bool)
  for i in range(n_in):
    if sparsity is not None and i % block == 0:
      score = w[i : i + block] ** 2 / d2[i : i + block, None]
      mask[i : i + block] = keep_topk(score, keep_count(sparsity, block * n_out))
    if n_m is not None and i % n_m[1] == 0:
      m = n_m[1]
      mask[i : i + m] = nm_keep(w[i : i + m] ** 2 / d2[i : i + m, None], n_m[0], m)
    if bits is not None and group is not None and i % group == 0:
      s, z = scale_zp(w[i : i + group], bits, symmetric)
    qi = w[i] if bits is None else fake_quant(w[i], s[0], z[0], bits)
    qi = np.where(mask[i], qi, 0.0)
    hinv = np.linalg.inv(h[i:, i:])
    w[i + 1 :] -= np.outer(hinv[0, 1:] / hinv[0, 0], w[i] - qi)
    q[i] = qi
  return q, mask


# --------------------------------------------------------------------------
# AWQ.
# --------------------------------------------------------------------------


def awq_scales(x, a):
  x2 = np.asarray(x, np.float64)
  s = np.maximum(np.abs(x2.reshape(-1, x2.shape[-1])).mean(axis=0) ** a, 1e-4)
  return s / np.sqrt(s.max() * s.min())


def awq(w, x, bits=4, group=128, grid_points=20, symmetric=False, clip_ratios=None):
  """AWQ from the formula: the output error of each exponent measured on ``x @ w``.

  Returns ``(kernel, s, alpha)``.
  """
  w = np.asarray(w, np.float64)
  x2 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  y = x2 @ w
  errs = []
  alphas = np.linspace(0.0, 1.0, grid_points)
  for a in alphas:
    s = awq_scales(x2, a)
    y_q = (x2 / s) @ rtn(w * s[:, None], bits, symmetric, group)
    errs.append(np.sum((y - y_q) ** 2))
  a = alphas[int(np.argmin(errs))]
  s = awq_scales(x2, a)
  ws = w * s[:, None]
  if clip_ratios is None:
    return rtn(ws, bits, symmetric, group) / s[:, None], s, a
  # Per group and output: the ratio minimizing the group's own output error.
  g = group or w.shape[0]
  xs = x2 / s
  out = np.empty_like(ws)
  for g0 in range(0, w.shape[0], g):
    blk, xg = ws[g0 : g0 + g], xs[:, g0 : g0 + g]
    best, best_err = None, None
    for r in clip_ratios:
      s_, z_ = scale_zp(blk, bits, symmetric, shrink=r)
      err = ((xg @ (blk - fake_quant(blk, s_, z_, bits))) ** 2).sum(axis=0)
      cand = fake_quant(blk, s_, z_, bits)
      if best is None:
        best, best_err = cand, err
      else:
        better = err < best_err
        best = np.where(better[None, :], cand, best)
        best_err = np.where(better, err, best_err)
    out[g0 : g0 + g] = best
  return out / s[:, None], s, a


# --------------------------------------------------------------------------
# SmoothQuant and w8a8.
# --------------------------------------------------------------------------


def smoothquant(w, x, alpha=0.5):
  w = np.asarray(w, np.float64)
  x2 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  act = np.maximum(np.abs(x2).max(axis=0), 1e-5)
  wmax = np.maximum(np.abs(w).max(axis=1), 1e-5)
  s = np.maximum(act**alpha / wmax ** (1.0 - alpha), 1e-5)
  return w * s[:, None], s


def w8a8(x, w):
  """int8 per-token activations times int8 per-output-channel weights ([-127, 127])."""
  x2 = np.asarray(x, np.float64).reshape(-1, np.shape(w)[0])
  w = np.asarray(w, np.float64)
  sx = np.abs(x2).max(axis=1, keepdims=True) / 127.0
  sx = np.where(sx > 0, sx, 1.0 / 127.0)
  sw = np.abs(w).max(axis=0, keepdims=True) / 127.0
  sw = np.where(sw > 0, sw, 1.0 / 127.0)
  qx = np.clip(np.round(x2 / sx), -127, 127)
  qw = np.clip(np.round(w / sw), -127, 127)
  return (qx @ qw) * sx * sw


def out_err(x, w, w_new):
  """||x w - x w_new||: the layer output error."""
  x2 = np.asarray(x, np.float64).reshape(-1, np.shape(w)[0])
  return float(np.linalg.norm(x2 @ np.asarray(w, np.float64) - x2 @ np.asarray(w_new, np.float64)))
