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
3. the small SVD ``Q^T A = U_b S V^T``; ``U = Q U_b``, taken without forming
   ``Q^T A``: ``A^T Q = Q_z R_z`` and the SVD of the ``(l, l)`` ``R_z^T``.

Sharding: ``A`` enters only matrix products (``A G``, ``A^T Q``, ``A W``) and
only ``(l, l)`` matrices are factorized (Cholesky, eigendecomposition, SVD);
the orthonormalization multiplies by the inverse of the small Cholesky factor
rather than solving against the tall matrix. XLA partitions all of it, so a
kernel split over its columns is never gathered (``benchmarks/memory.py``).
Under a mesh in context (``jax.set_mesh``) the tall ``(m, l)`` and ``(n, l)``
matrices are constrained to be split over their rows, so that products over a
kernel's sharded axis are not all-reduced into replicated copies: a kernel
split over its rows holds about 6 of its shards in temporaries instead of 12.

``truncated_svd`` picks the method from the shapes alone (static under jit):
randomized when ``l = 2 r <= min(m, n) / 4`` and ``min(m, n) >= 256``, with ``q = 8``
passes, which keeps the Frobenius error within 0.1% of the Eckart-Young optimum
on flat and on slowly decaying spectra (tested against numpy's float64 SVD).
The random test matrix is a hash of each entry's index and a fixed seed
(``sketch_matrix``), so the result is deterministic and does not depend on
how the kernel is sharded. A
kernel whose rank is below ``l`` (no ``l`` independent directions to find)
breaks the Cholesky factorizations down; the iteration is then redone with an
orthonormalization by eigendecomposition that drops null directions. The full
SVD (small kernels, large ranks) is LAPACK's and gathers a sharded kernel.
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


def _split_rows(y: Array) -> Array:
  """``y`` (tall) constrained to be split over its rows across the context mesh's Auto axes.

  Products with a sharded kernel contract over its sharded axis; XLA then
  all-reduces them into replicated tall matrices unless told otherwise. Split
  over their rows (a reduce-scatter instead), every ``(m, l)`` and ``(n, l)``
  matrix of the iteration stays sharded, whichever axis the kernel is split
  over. No-op without a mesh in context (``jax.set_mesh``), or when the rows do
  not divide among the devices.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return y
  axes = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Auto)
  size = 1
  for n in axes:
    size *= mesh.shape[n]
  if not axes or size == 1 or y.shape[0] % size:
    return y
  return jax.lax.with_sharding_constraint(y, jax.sharding.PartitionSpec(axes, None))


def sketch_matrix(shape: tuple[int, int], seed: int, dtype=jnp.float32) -> Array:
  """A random ``(n, l)`` test matrix, uniform on ``[-1, 1)``, from a hash of each entry's index.

  Any random matrix with independent, mean-zero, sub-Gaussian entries serves
  the randomized range finder (Halko et al. 2011, section 11). A counter-based
  hash of ``(seed, row, column)`` (Wellons's ``lowbias32``) makes it in one
  elementwise pass: where the matrix is sharded each device computes only
  its own rows, and no threefry state (several uint32 copies of the matrix) is
  held. The matrix does not depend on how it is sharded.

  Example:
    >>> from jaxcompress.lowrank.linalg import sketch_matrix
    >>> g = sketch_matrix((1000, 8), 0)
    >>> bool(abs(float(g.mean())) < 0.05), bool(abs(float((g ** 2).mean()) - 1 / 3) < 0.02)
    (True, True)
  """
  n, l = shape
  i = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  j = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  x = i * jnp.uint32(l) + j + jnp.uint32(seed) * jnp.uint32(0x9E3779B9)
  for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    x = (x ^ (x >> shift)) * jnp.uint32(mult)
  x = x ^ (x >> 16)
  # The top 24 bits, as a float in [-1, 1).
  return ((x >> 8).astype(jnp.float32) * (2.0**-23) - 1.0).astype(dtype)


def _chol_qr(y: Array, gram: Array) -> Array:
  # y R^-T with R^-1 from a triangular solve of the small (l, l) factor: the tall y
  # then meets only a matrix product, which XLA partitions where y is sharded (a
  # triangular solve against y itself would gather it).
  r = jnp.linalg.cholesky(gram)
  r_inv = jax.scipy.linalg.solve_triangular(r, jnp.eye(gram.shape[0], dtype=y.dtype), lower=True)
  return y @ r_inv.T


def orthonormalize(y: Array) -> Array:
  """An orthonormal basis of the columns of a tall ``y`` by shifted CholeskyQR3.

  ``jnp.linalg.qr`` of a ``(2048, 128)`` float32 matrix takes seconds on XLA's
  CPU backend; three Cholesky factorizations of the small Gram matrix take
  milliseconds. The first is shifted (Fukaya et al. 2020, "Shifted Cholesky QR
  for computing the QR factorization of ill-conditioned matrices"), so that it
  cannot break down when ``y`` is ill-conditioned; the two plain passes after
  it (CholeskyQR2) restore orthogonality to float32 rounding. Only ``(l, l)``
  matrices are factorized; ``y`` enters products alone, so a ``y`` sharded
  over its rows stays sharded.

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


def _orthonormalize_rank_revealing(y: Array) -> Array:
  """Orthonormal columns for the numerical range of ``y``, zero columns for the rest.

  Two passes of ``y V D^-1/2`` from the eigendecomposition ``y^T y = V D V^T``,
  with the eigenvalues below ``10 sqrt(m) eps max(D)`` (rounding of a rank
  deficient ``y``) dropped: unlike Cholesky this cannot break down when ``y``
  has fewer independent columns than ``l``, and like it only ``(l, l)``
  matrices are factorized.
  """
  m, l = y.shape
  tol = 10.0 * m**0.5 * jnp.finfo(y.dtype).eps
  for _ in range(2):
    w, v = jnp.linalg.eigh(y.T @ y)
    keep = w > tol * jnp.max(w)
    y = y @ (v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1.0)), 0.0))
  return y


def _is_orthonormal(q: Array) -> Array:
  l = q.shape[1]
  return jnp.all(jnp.isfinite(q)) & (jnp.max(jnp.abs(q.T @ q - jnp.eye(l, dtype=q.dtype))) < 1e-3)


def _subspace(a: Array, g: Array, power_iters: int, orth) -> tuple[Array, Array, Array]:
  """``(q, z, qz)``: ``q`` a basis of the range of ``a`` found from ``g``, ``z = a^T q``
  and ``qz`` a basis of the columns of ``z``."""
  rows = _split_rows
  q = rows(orth(rows(a @ g)))
  q = jax.lax.fori_loop(0, power_iters, lambda _, q: rows(orth(rows(a @ rows(orth(rows(a.T @ q)))))), q)
  z = rows(a.T @ q)
  return q, z, rows(orth(z))


def randomized_svd(a: Array, r: int, *, power_iters: int = POWER_ITERS, seed: int = 0) -> tuple[Array, Array, Array]:
  """The ``r`` leading singular triplets of ``a`` by randomized subspace iteration.

  Every step is a product with ``a`` (``a G``, ``a^T Q``, ``a W``) or a
  factorization of an ``(l, l)`` matrix, ``l = r + max(10, r)``, so ``a`` is
  never gathered where it is sharded. The SVD of ``B = Q^T a`` is taken from
  ``B^T = a^T Q = Q_z R_z`` (``Q_z`` orthonormal, ``R_z`` ``(l, l)``): with
  ``R_z^T = U' S V'^T``, ``B = U' S (Q_z V')^T``, so ``U = Q U'`` and
  ``V^T = (Q_z V')^T``, both products with tall sharded matrices. A kernel
  whose rank is below ``l`` makes the Cholesky factorizations break down; it
  is then redone with a rank-revealing (eigendecomposition) orthonormalization,
  which is also sharded.

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
  g = _split_rows(sketch_matrix((n, l), seed, a.dtype))
  q, z, qz = _subspace(a, g, power_iters, orthonormalize)
  ok = _is_orthonormal(q) & _is_orthonormal(qz)
  q, z, qz = jax.lax.cond(
      ok,
      lambda: (q, z, qz),
      lambda: _subspace(a, g, power_iters, _orthonormalize_rank_revealing),
  )
  ur, s, vrt = jnp.linalg.svd((qz.T @ z).T)  # R_z^T = U' S V'^T, (l, l)
  return q @ ur[:, :r], s[:r], (qz @ vrt[:r].T).T


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
