"""Low-rank stages: a kernel replaced by trainable factors.

``SVD`` factorizes a kernel, seen as the matrix ``(prod(shape[:-1]), out)``, by
its truncated singular value decomposition, the best approximation of its rank
in Frobenius norm (Eckart-Young). ``Tucker2`` factorizes a conv kernel
``(*spatial, in, out)`` over its two channel axes by a truncated higher-order
SVD (HOSVD). Both replace the weight: the optimizer trains the factors, and
``spec.apply`` multiplies them out to the kernel, so the model is unchanged.

Where the singular values go: ``SVD`` splits them evenly, ``U = U_r sqrt(S_r)``
and ``V = sqrt(S_r) V_r^T``. Both factors then have the same singular values
(``sqrt(s)``), so neither dominates the gradient or the quantization range of
the other. ``Tucker2`` keeps orthonormal channel factors and the scale in the
core, as the HOSVD gives them.

Ranks are static shapes and are chosen at ``spec.init`` by a rank rule
(``jaxcompress.lowrank.ranks``). Rules that read singular values (``Energy``,
``Budget``) need concrete params; ``freeze_ranks`` fixes them beforehand when
init must run traced (``spec.shardings``, ``jax.jit(spec.init)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import check_int, error_if
from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import Rule, Spec
from jaxcompress.core.stage import Stage
from jaxcompress.lowrank.factors import Factors, Tucker2Factors
from jaxcompress.lowrank.linalg import truncated_svd
from jaxcompress.lowrank.ranks import Budget, Energy, Fixed, Fraction, RankRule

Array = jax.Array


def _svd_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _check_concrete(stage: Stage, values: Sequence[Any], paths: Sequence[str]) -> None:
  for v, p in zip(values, paths):
    if isinstance(v, jax.core.Tracer):
      raise ValueError(
          f"{stage.describe()} picks the rank of leaf {p!r} from its singular values, which "
          "needs concrete params, but init got traced values (under jax.jit or "
          "jax.eval_shape, as inside spec.shardings). Call spec.init(params) outside jit, "
          "or fix the ranks first with spec = jc.lowrank.freeze_ranks(spec, params), or "
          "give a rank or fraction, which need only shapes."
      )


def _check_finite(stage_name: str, values: Sequence[Any], paths: Sequence[str]) -> None:
  for v, p in zip(values, paths):
    error_if(
        ~jnp.all(jnp.isfinite(v)),
        f"{stage_name}: leaf {p!r} holds NaN or inf values; its factorization would be NaN "
        "throughout. Find where they come from (a diverged training step, a corrupt "
        "checkpoint) and factorize finite weights.",
    )


def _check_rank_rule(stage_name: str, rank: Any) -> None:
  if not isinstance(rank, RankRule):
    raise TypeError(
        f"{stage_name}: rank must be a rank rule such as lowrank.Fixed(64), "
        f"lowrank.Fraction(0.25), lowrank.Energy(0.9) or lowrank.Budget(100_000), got "
        f"{rank!r}. The factories lowrank.svd(rank=64) and lowrank.tucker2(rank=16) build "
        "the rule for you."
    )


def _check_rank(stage_name: str, path: str, shape, what: str, r: Any, full: int) -> int:
  if isinstance(r, tuple):
    raise TypeError(
        f"{stage_name}: leaf {path!r}: a pair of ranks {r!r} is for Tucker2 (r_in, r_out); "
        "SVD takes one int."
    )
  if not 1 <= r <= full:
    raise ValueError(
        f"{stage_name}: leaf {path!r} of shape {tuple(shape)} has {what} {full}, but the "
        f"rank asked for is {r}. Give a rank in [1, {full}], or a fraction of the full rank."
    )
  return int(r)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVD(Stage):
  """Replaces a kernel by its truncated SVD factors ``U (m, r)`` and ``V (r, n)``.

  The kernel is seen as the matrix ``(m, n) = (prod(shape[:-1]), shape[-1])``:
  a Dense kernel ``(in, out)`` as is, a conv kernel ``(h, w, in, out)`` as
  ``(h * w * in, out)``. The factors are the trainable params (a ``Factors``
  node, in the kernel's dtype), with the singular values split evenly between
  them; ``apply`` returns the ``Factors``, which the spec multiplies out (later
  stages of the rule apply to each factor first). The SVD runs in float32 (or
  wider).

  Args:
    rank: a rank rule: ``Fixed``, ``Fraction``, ``Energy`` or ``Budget``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3))  # a rank-1 (4, 3) kernel
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.SVD(rank=jc.lowrank.Fixed(1))])])
    >>> t, s = spec.init({"w": w})
    >>> t["w"].params["lowrank"].u.shape, t["w"].params["lowrank"].v.shape
    ((4, 1), (1, 3))
    >>> bool(jnp.allclose(spec.apply(t, s)["w"], w, atol=1e-5))
    True
  """

  replaces_weight: ClassVar[bool] = True
  name: ClassVar[str] = "lowrank"

  rank: RankRule

  def __post_init__(self):
    _check_rank_rule("SVD", self.rank)
    if isinstance(self.rank, Fixed):
      r = self.rank.rank
      given = [v for _, v in r] if isinstance(r, tuple) and r and isinstance(r[0], tuple) else [r]
      pairs = [v for v in given if isinstance(v, tuple)]
      if pairs:
        raise TypeError(
            f"SVD: rank {pairs[0]!r} is a pair of ranks (r_in, r_out), which is for Tucker2; "
            "SVD takes one int per leaf, e.g. lowrank.svd(rank=64)."
        )

  @staticmethod
  def _matrix_shape(value: Any, path: str) -> tuple[int, int]:
    shape = tuple(value.shape)
    if len(shape) < 2:
      raise ValueError(
          f"SVD: leaf {path!r} has shape {shape}; a low-rank factorization needs a kernel of "
          "at least 2 dims. Narrow the rule's pattern to kernels (e.g. r'.*kernel')."
      )
    return math.prod(shape[:-1]), shape[-1]

  def _ranks(self, values, paths, spectra) -> list[int]:
    dims = [self._matrix_shape(v, p) for v, p in zip(values, paths)]
    full = [min(m, n) for m, n in dims]
    ranks = self.rank.select(full, spectra, [m + n for m, n in dims], list(paths))
    return [
        _check_rank("SVD", p, v.shape, "full rank", r, f)
        for v, p, r, f in zip(values, paths, ranks, full)
    ]

  def select_ranks(self, values: Sequence[Array], paths: Sequence[str]) -> list[int]:
    """The rank this stage gives each leaf (concrete values for ``Energy``/``Budget``).

    Args:
      values: the kernels.
      paths: their leaf paths.

    Returns:
      One int per kernel.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> jc.lowrank.svd(energy=0.9).select_ranks([jnp.diag(jnp.array([3.0, 2.0, 1.0]))], ["w"])
      [2]
    """
    spectra = [None] * len(values)
    if self.rank.needs_values:
      _check_concrete(self, values, paths)
      _check_finite("SVD", values, paths)
      spectra = [
          np.asarray(jnp.linalg.svd(self._matrix(v, p), compute_uv=False))
          for v, p in zip(values, paths)
      ]
    return self._ranks(values, paths, spectra)

  def _matrix(self, value: Array, path: str) -> Array:
    m, n = self._matrix_shape(value, path)
    return value.reshape(m, n).astype(_svd_dtype(value.dtype))

  def init_group(self, values, *, paths, keys):
    del keys
    for v, p in zip(values, paths):
      self._matrix_shape(v, p)
    _check_finite("SVD", values, paths)
    out = []
    for v, p, r in zip(values, paths, self.select_ranks(values, paths)):
      # Only the r leading triplets: a randomized SVD when r is small (linalg.truncated_svd).
      u, s, vt = truncated_svd(self._matrix(v, p), r)
      root = jnp.sqrt(s)
      factors = Factors((u * root).astype(v.dtype), (root[:, None] * vt).astype(v.dtype), tuple(v.shape))
      out.append((factors, None))
    return out

  def apply(self, value, params, state):
    del value, state
    return params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tucker2(Stage):
  """Replaces a conv kernel ``(*spatial, in, out)`` by a Tucker-2 decomposition.

  The channel factors are the leading left singular vectors of the kernel's
  mode-``in`` and mode-``out`` unfoldings (a truncated HOSVD); the core is the
  kernel projected on them: ``core = W x_in U_in^T x_out U_out``. The params are
  a ``Tucker2Factors`` node ``(core (*spatial, r_in, r_out), u_in (in, r_in),
  u_out (r_out, out))`` in the kernel's dtype. A rank rule gives ``(r_in,
  r_out)``: ``Fixed`` takes an int (both) or a pair; ``Fraction`` and ``Energy``
  apply to each mode's unfolding.

  With ``refine_iters > 0`` the HOSVD factors are refined by alternating
  least squares (HOOI, De Lathauwer et al. 2000): each pass replaces ``u_in``
  by the leading left singular vectors of the kernel projected on ``u_out``,
  then ``u_out`` likewise. Each pass can only lower the reconstruction error.

  Args:
    rank: a ``Fixed``, ``Fraction`` or ``Energy`` rank rule.
    refine_iters: HOOI passes after the HOSVD (``0``: the truncated HOSVD).

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.Tucker2(rank=jc.lowrank.Fixed((4, 6)))])])
    >>> t, s = spec.init({"w": w})
    >>> t["w"].params["lowrank"].core.shape, spec.apply(t, s)["w"].shape
    ((3, 3, 4, 6), (3, 3, 8, 16))
  """

  replaces_weight: ClassVar[bool] = True
  name: ClassVar[str] = "lowrank"

  rank: RankRule
  refine_iters: int = 0

  def __post_init__(self):
    _check_rank_rule("Tucker2", self.rank)
    check_int("Tucker2", "refine_iters", self.refine_iters, low=0)
    if isinstance(self.rank, Budget):
      raise TypeError(
          "Tucker2: a parameter Budget is not supported (a Tucker-2 core's cost couples "
          "both ranks); give Fixed, Fraction or Energy ranks, or use SVD with a Budget."
      )

  @staticmethod
  def _check_shape(value: Any, path: str) -> tuple[int, int, int]:
    shape = tuple(value.shape)
    if len(shape) < 3:
      raise ValueError(
          f"Tucker2: leaf {path!r} has shape {shape}; Tucker-2 factorizes conv kernels "
          "(*spatial, in, out) of at least 3 dims. Use SVD for Dense kernels."
      )
    return math.prod(shape[:-2]), shape[-2], shape[-1]

  @staticmethod
  def _unfoldings(value: Array) -> tuple[Array, Array]:
    w = value.astype(_svd_dtype(value.dtype))
    return (
        jnp.moveaxis(w, -2, 0).reshape(value.shape[-2], -1),
        jnp.moveaxis(w, -1, 0).reshape(value.shape[-1], -1),
    )

  def _ranks(self, values, paths, spectra) -> list[tuple[int, int]]:
    full, shapes = [], []
    for v, p in zip(values, paths):
      s, i, o = self._check_shape(v, p)
      full += [min(i, s * o), min(o, s * i)]
      shapes.append(tuple(v.shape))
    if isinstance(self.rank, Fixed):
      flat = []
      for p in paths:
        r = self.rank.for_path(p)
        flat += list(r) if isinstance(r, tuple) else [r, r]
    else:
      flat = self.rank.select(full, spectra, [1] * len(full), [p for p in paths for _ in (0, 1)])
    out = []
    for n, p in enumerate(paths):
      r_in = _check_rank("Tucker2", p, shapes[n], "input-channel rank", flat[2 * n], full[2 * n])
      r_out = _check_rank("Tucker2", p, shapes[n], "output-channel rank", flat[2 * n + 1], full[2 * n + 1])
      out.append((r_in, r_out))
    return out

  def select_ranks(self, values: Sequence[Array], paths: Sequence[str]) -> list[tuple[int, int]]:
    """The ``(r_in, r_out)`` this stage gives each leaf.

    Args:
      values: the conv kernels (concrete for ``Energy``).
      paths: their leaf paths.

    Returns:
      One pair per kernel.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> jc.lowrank.tucker2(fraction=0.5).select_ranks([jnp.ones((3, 3, 8, 4))], ["conv"])
      [(4, 2)]
    """
    spectra = [None] * (2 * len(values))
    if self.rank.needs_values:
      _check_concrete(self, values, paths)
      _check_finite("Tucker2", values, paths)
      spectra = [
          np.asarray(jnp.linalg.svd(a, compute_uv=False))
          for v in values
          for a in self._unfoldings(v)
      ]
    return self._ranks(values, paths, spectra)

  def init_group(self, values, *, paths, keys):
    del keys
    for v, p in zip(values, paths):
      self._check_shape(v, p)
    if self.rank.needs_values:
      _check_concrete(self, values, paths)
    _check_finite("Tucker2", values, paths)
    out = []
    for v, (r_in, r_out) in zip(values, self.select_ranks(values, paths)):
      w = v.astype(_svd_dtype(v.dtype))
      a_in, a_out = self._unfoldings(v)
      u_in, u_out = truncated_svd(a_in, r_in)[0], truncated_svd(a_out, r_out)[0]

      def hooi(_, us, w=w, r_in=r_in, r_out=r_out):
        u_in, u_out = us
        y = jnp.einsum("...io,ob->...ib", w, u_out)  # (*spatial, in, r_out)
        u_in = truncated_svd(jnp.moveaxis(y, -2, 0).reshape(y.shape[-2], -1), r_in)[0]
        z = jnp.einsum("...io,ia->...ao", w, u_in)  # (*spatial, r_in, out)
        u_out = truncated_svd(jnp.moveaxis(z, -1, 0).reshape(z.shape[-1], -1), r_out)[0]
        return u_in, u_out

      u_in, u_out = jax.lax.fori_loop(0, self.refine_iters, hooi, (u_in, u_out))
      core = jnp.einsum("...io,ia,ob->...ab", w, u_in, u_out)
      factors = Tucker2Factors(core.astype(v.dtype), u_in.astype(v.dtype), u_out.T.astype(v.dtype))
      out.append((factors, None))
    return out

  def apply(self, value, params, state):
    del value, state
    return params


# ---------------------------------------------------------------------------
# Factories.
# ---------------------------------------------------------------------------


def _rank_rule(fn: str, rank, fraction, energy, budget=None) -> RankRule:
  given = {
      k: v
      for k, v in (("rank", rank), ("fraction", fraction), ("energy", energy), ("budget", budget))
      if v is not None
  }
  if len(given) != 1:
    raise ValueError(
        f"lowrank.{fn}: give exactly one of rank=, fraction=, energy=" + (", budget=" if fn == "svd" else "")
        + f"; got {sorted(given) or 'none'}."
    )
  if rank is not None:
    return Fixed(rank)
  if fraction is not None:
    return Fraction(fraction)
  if energy is not None:
    return Energy(energy)
  return Budget(budget)


def svd(
    rank: int | dict[str, int] | None = None,
    *,
    fraction: float | None = None,
    energy: float | None = None,
    budget: int | None = None,
) -> SVD:
  """An ``SVD`` stage with its rank rule given by exactly one keyword.

  Args:
    rank: a fixed rank, or ``{leaf path: rank}``.
    fraction: a fraction in ``(0, 1]`` of each leaf's full rank.
    energy: a threshold in ``(0, 1]`` on the retained energy.
    budget: a number of factor parameters shared by the rule's leaves.

  Returns:
    ``SVD(rank=...)`` with ``Fixed``, ``Fraction``, ``Energy`` or ``Budget``.

  Example:
    >>> import jax, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(fraction=0.5)])])
    >>> t, s = spec.init(params)
    >>> t["w"].params["lowrank"].rank
    4
  """
  return SVD(rank=_rank_rule("svd", rank, fraction, energy, budget))


def tucker2(
    rank: int | tuple[int, int] | dict[str, Any] | None = None,
    *,
    fraction: float | None = None,
    energy: float | None = None,
    refine_iters: int = 0,
) -> Tucker2:
  """A ``Tucker2`` stage with its rank rule given by exactly one keyword.

  Args:
    rank: a fixed rank for both channel modes, a pair ``(r_in, r_out)``, or
      ``{leaf path: rank or pair}``.
    fraction: a fraction in ``(0, 1]`` of each mode's full rank.
    energy: a threshold in ``(0, 1]`` on each mode's retained energy.
    refine_iters: HOOI passes after the truncated HOSVD.

  Returns:
    ``Tucker2(rank=..., refine_iters=refine_iters)``.

  Example:
    >>> import jaxcompress as jc
    >>> jc.lowrank.tucker2(rank=(4, 8)).rank
    Fixed(rank=(4, 8))
  """
  return Tucker2(rank=_rank_rule("tucker2", rank, fraction, energy), refine_iters=refine_iters)


def freeze_ranks(spec: Spec, params: Any) -> Spec:
  """The spec with every value-dependent rank rule replaced by the ranks it picks.

  ``Energy`` and ``Budget`` read singular values, so ``spec.init`` needs
  concrete params with them. The returned spec gives the same factorization with
  ``Fixed`` per-leaf ranks, which need only shapes: use it for
  ``spec.shardings``, ``jax.eval_shape(spec.init, ...)`` and
  ``jax.jit(spec.init, out_shardings=...)``.

  Args:
    spec: a spec.
    params: concrete params (the ones ``spec.init`` will get).

  Returns:
    A ``Spec`` with the same rules, ``Energy``/``Budget`` low-rank stages replaced
    by ``Fixed({leaf path: rank})``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
    >>> spec = jc.lowrank.freeze_ranks(jc.Spec([jc.Rule("w", [jc.lowrank.svd(energy=0.9)])]), params)
    >>> spec.rules[0].stages[0].rank
    Fixed(rank=(('w', 2),))
    >>> jax.eval_shape(spec.init, params)[0]["w"].params["lowrank"].u.shape
    (3, 2)
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_str(p) for p, _ in flat]
  leaves = [v for _, v in flat]
  owner = [next((i for i, r in enumerate(spec.rules) if r.matches(p)), None) for p in paths]
  rules = []
  for i, rule in enumerate(spec.rules):
    first = rule.stages[0]
    if isinstance(first, (SVD, Tucker2)) and first.rank.needs_values:
      idxs = [j for j, o in enumerate(owner) if o == i]
      if idxs:
        sel = [paths[j] for j in idxs]
        ranks = first.select_ranks([leaves[j] for j in idxs], sel)
        first = dataclasses.replace(first, rank=Fixed(dict(zip(sel, ranks))))
        rule = Rule(rule.pattern, (first,) + tuple(rule.stages[1:]))
    rules.append(rule)
  return Spec(rules)
