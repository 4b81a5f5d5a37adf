"""Truncated SVD for the low-rank stages: the full LAPACK SVD, or a randomized one.

A rank-``r`` factorization needs only the ``r`` leading singular triplets. The
full SVD of an ``(m, n)`` matrix costs ``O(m n min(m, n))`` whatever ``r``; when
``r`` is small next to ``min(m, n)``, randomized subspace iteration (Halko,
Martinsson and Tropp 2011, algorithms 4.4 and 5.1) costs ``O(m n l)`` per pass,
``l = r + oversampling``:

1. ``Y = A G`` for a Gaussian ``G (n, l)``; ``Q = orth(Y)``;
2. ``q`` times: ``Q = orth(A orth(A^T Q))`` (orthonormalizing after every
   product keeps float32 accurate: no power of ``A^T A`` is ever formed; the
   orthonormalization is a shifted CholeskyQR3, which XLA runs far faster on
   CPU than ``jnp.linalg.qr``);
3. the small SVD ``Q^T A = U_b S V^T``; ``U = Q U_b``.

``truncated_svd`` picks the method from the shapes alone (static under jit):
randomized when ``l = 2 r <= min(m, n) / 4`` and ``min(m, n) >= 256``, with ``q = 8``
passes, which keeps the Frobenius error within 0.1% of the Eckart-Young optimum
on flat and on slowly decaying spectra (tested against numpy's float64 SVD).
The random matrix comes from a fixed key, so the result is deterministic. A
kernel whose rank is below ``l`` (no ``l`` independent directions to find)
falls back to the full SVD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: Randomized SVD is used when rank + oversampling is at most this fraction of min(m, n) ...
RANDOMIZED_MAX_FRACTION = 0.25
#: ... and min(m, n) is at least this (below, the full SVD is cheap anyway).
RANDOMIZED_MIN_SIZE = 256
#: Subspace-iteration passes of the randomized SVD.
POWER_ITERS = 8


def _oversampling(r: int) -> int:
  return max(10, r)


def uses_randomized(shape: tuple[int, int], r: int) -> bool:
  """Whether ``truncated_svd`` takes the randomized path for this shape and rank.

  Args:
    shape: ``(m, n)``.
    r: the rank.

  Returns:
    True when ``r + max(10, r) <= min(m, n) / 4`` and ``min(m, n) >= 256``.

  Example:
    >>> from jaxcompress.lowrank.linalg import uses_randomized
    >>> uses_randomized((4096, 4096), 64), uses_randomized((4096, 4096), 2048)
    (True, False)
  """
  small = min(shape)
  return small >= RANDOMIZED_MIN_SIZE and r + _oversampling(r) <= RANDOMIZED_MAX_FRACTION * small


def _chol_qr(y: Array, gram: Array) -> Array:
  r = jnp.linalg.cholesky(gram)
  return jax.scipy.linalg.solve_triangular(r, y.T, lower=True).T


def orthonormalize(y: Array) -> Array:
  """An orthonormal basis of the columns of a tall ``y`` by shifted CholeskyQR3.

  ``jnp.linalg.qr`` of a ``(2048, 128)`` float32 matrix takes seconds on XLA's
  CPU backend; three Cholesky factorizations of the small Gram matrix take
  milliseconds. The first is shifted (Fukaya et al. 2020, "Shifted Cholesky QR
  for computing the QR factorization of ill-conditioned matrices"), so that it
  cannot break down when ``y`` is ill-conditioned; the two plain passes after
  it (CholeskyQR2) restore orthogonality to float32 rounding.

  Args:
    y: float ``(m, l)``, ``m >= l``, of full column rank.

  Returns:
    ``(m, l)`` with orthonormal columns spanning those of ``y``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxcompress.lowrank.linalg import orthonormalize
    >>> q = orthonormalize(jax.random.normal(jax.random.key(0), (100, 8)))
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(8), atol=1e-5))
    True
  """
  m, l = y.shape
  gram = y.T @ y
  shift = 11.0 * (m * l + l * (l + 1)) * jnp.finfo(y.dtype).eps * jnp.trace(gram)
  y = _chol_qr(y, gram + shift * jnp.eye(l, dtype=y.dtype))
  y = _chol_qr(y, y.T @ y)
  return _chol_qr(y, y.T @ y)


def randomized_svd(a: Array, r: int, *, power_iters: int = POWER_ITERS, seed: int = 0) -> tuple[Array, Array, Array]:
  """The ``r`` leading singular triplets of ``a`` by randomized subspace iteration.

  Args:
    a: float ``(m, n)``.
    r: number of triplets, at most ``min(m, n)``.
    power_iters: subspace-iteration passes (each two products with ``a``).
    seed: seed of the Gaussian test matrix.

  Returns:
    ``(u (m, r), s (r,), vt (r, n))``, ``s`` descending.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxcompress.lowrank.linalg import randomized_svd
    >>> a = jax.random.normal(jax.random.key(1), (64, 48))
    >>> u, s, vt = randomized_svd(a, 4)
    >>> bool(jnp.allclose(s, jnp.linalg.svd(a, compute_uv=False)[:4], rtol=1e-3))
    True
  """
  m, n = a.shape
  l = min(r + _oversampling(r), m, n)
  g = jax.random.normal(jax.random.key(seed), (n, l), a.dtype)
  q = orthonormalize(a @ g)

  def body(_, q):
    return orthonormalize(a @ orthonormalize(a.T @ q))

  q = jax.lax.fori_loop(0, power_iters, body, q)
  # A kernel of rank below l has no l orthonormal directions in its range: the
  # Cholesky factorizations then break down. Fall back to the full SVD there.
  ok = jnp.all(jnp.isfinite(q)) & (jnp.max(jnp.abs(q.T @ q - jnp.eye(l, dtype=q.dtype))) < 1e-3)

  def from_basis():
    ub, s, vt = jnp.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :r], s[:r], vt[:r]

  def full():
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return u[:, :r], s[:r], vt[:r]

  return jax.lax.cond(ok, from_basis, full)


def truncated_svd(a: Array, r: int) -> tuple[Array, Array, Array]:
  """The ``r`` leading singular triplets of ``a``, by the cheaper accurate method.

  Args:
    a: float ``(m, n)`` (float32 or wider).
    r: number of triplets, in ``[1, min(m, n)]``.

  Returns:
    ``(u (m, r), s (r,), vt (r, n))``, ``s`` descending.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.lowrank.linalg import truncated_svd
    >>> u, s, vt = truncated_svd(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 2)
    >>> s.tolist()
    [3.0, 2.0]
  """
  if uses_randomized(tuple(a.shape), r):
    return randomized_svd(a, r)
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  return u[:, :r], s[:r], vt[:r]
