"""Rank rules: fixed, fraction, energy threshold, a shared parameter budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import lowrank


def _with_spectrum(m, n, s, seed):
  """An (m, n) float32 matrix with singular values s (numpy, float64 built)."""
  rng = np.random.default_rng(seed)
  q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
  q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
  k = len(s)
  return (q1[:, :k] * np.asarray(s)) @ q2[:, :k].T


def _ranks(t):
  return {
      k: v.params["lowrank"].rank
      for k, v in t.items()
  }


def _reference_energy_rank(w, threshold):
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  total = np.sum(s**2)
  for r in range(1, len(s) + 1):
    if np.sum(s[:r] ** 2) / total >= threshold:
      return r
  return len(s)


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_energy_picks_the_smallest_rank_meeting_the_threshold(threshold):
  rng = np.random.default_rng(0)
  params = {
      "a": (rng.standard_normal((20, 14)) * np.exp(-np.arange(14) / 3.0)).astype(np.float32),
      "b": rng.standard_normal((9, 16)).astype(np.float32),
  }
  spec = jc.Spec([jc.Rule("a|b", [lowrank.svd(energy=threshold)])])
  t, s = spec.init(jax.tree_util.tree_map(jnp.asarray, params))
  got = _ranks(t)
  for k, w in params.items():
    r = _reference_energy_rank(w, threshold)
    assert got[k] == r, (k, got[k], r)
    sv = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    retained = np.sum(sv[: got[k]] ** 2) / np.sum(sv**2)
    assert retained >= threshold - 1e-6
    if got[k] > 1:
      assert np.sum(sv[: got[k] - 1] ** 2) / np.sum(sv**2) < threshold


def test_energy_on_a_known_spectrum():
  # Energies 0.4, 0.3, 0.2, 0.1: threshold 0.65 needs 2 directions, 0.71 needs 3.
  w = _with_spectrum(6, 5, np.sqrt([0.4, 0.3, 0.2, 0.1]), seed=1).astype(np.float32)
  for threshold, expected in [(0.35, 1), (0.65, 2), (0.71, 3), (0.95, 4)]:
    stage = lowrank.svd(energy=threshold)
    assert stage.select_ranks([jnp.asarray(w)], ["w"]) == [expected]


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_fraction_of_full_rank(fraction):
  params = {"a": jnp.ones((20, 10)), "b": jnp.ones((3, 3, 4, 7))}
  spec = jc.Spec([jc.Rule("a|b", [lowrank.svd(fraction=fraction)])])
  t, _ = jax.eval_shape(spec.init, params)
  got = {k: v.params["lowrank"].u.shape[-1] for k, v in t.items()}
  # The smallest rank r with r / full >= fraction.
  smallest = lambda n: next(r for r in range(1, n + 1) if r / n >= fraction)
  assert got == {"a": smallest(10), "b": smallest(7)}


def _reference_budget(spectra, costs, budget):
  """Greedy by share of energy per parameter, written as a plain loop."""
  ranks = [1] * len(spectra)
  left = budget - sum(costs)
  shares = [np.asarray(s, np.float64) ** 2 / np.sum(np.asarray(s, np.float64) ** 2) for s in spectra]
  while True:
    best, best_i = -1.0, None
    for i, s in enumerate(shares):
      if ranks[i] < len(s) and costs[i] <= left and s[ranks[i]] / costs[i] > best:
        best, best_i = s[ranks[i]] / costs[i], i
    if best_i is None:
      return ranks
    ranks[best_i] += 1
    left -= costs[best_i]


def _budget_params():
  rng = np.random.default_rng(2)
  return {
      "l0": (rng.standard_normal((24, 16)) * np.exp(-np.arange(16) / 2.0)).astype(np.float32),
      "l1": rng.standard_normal((16, 12)).astype(np.float32),
      "l2": (rng.standard_normal((12, 20)) * 3.0).astype(np.float32),
  }


@pytest.mark.parametrize("budget", [120, 331, 777])
def test_budget_is_met_or_under_and_greedy(budget):
  params = _budget_params()
  spec = jc.Spec([jc.Rule("l.", [lowrank.svd(budget=budget)])])
  t, s = spec.init(jax.tree_util.tree_map(jnp.asarray, params))
  used = sum(v.params["lowrank"].num_params for v in t.values())
  assert used <= budget
  names = sorted(params)
  costs = [sum(params[k].shape) for k in names]
  full = [min(params[k].shape) for k in names]
  ranks = [t[k].params["lowrank"].rank for k in names]
  # Nothing more fits: every leaf below full rank costs more than what is left.
  assert all(r == f or c > budget - used for r, f, c in zip(ranks, full, costs))
  spectra = [np.linalg.svd(np.asarray(params[k], np.float64), compute_uv=False) for k in names]
  assert ranks == _reference_budget(spectra, costs, budget)


def test_budget_met_exactly_when_costs_divide_it():
  rng = np.random.default_rng(3)
  params = {f"l{i}": jnp.asarray(rng.standard_normal((10, 6)), jnp.float32) for i in range(3)}
  spec = jc.Spec([jc.Rule("l.", [lowrank.svd(budget=16 * 8)])])
  t, _ = spec.init(params)
  assert sum(v.params["lowrank"].num_params for v in t.values()) == 128


def test_budget_prefers_the_leaf_with_more_energy_to_gain():
  # A rank-1-dominated leaf and a flat-spectrum leaf of the same shape.
  steep = _with_spectrum(10, 10, [10.0] + [0.01] * 9, seed=4).astype(np.float32)
  flat = _with_spectrum(10, 10, [1.0] * 10, seed=5).astype(np.float32)
  spec = jc.Spec([jc.Rule("steep|flat", [lowrank.svd(budget=20 * 6)])])
  t, _ = spec.init({"steep": jnp.asarray(steep), "flat": jnp.asarray(flat)})
  assert (t["steep"].params["lowrank"].rank, t["flat"].params["lowrank"].rank) == (1, 5)


def test_per_leaf_fixed_ranks():
  params = {"a": jnp.ones((8, 6)), "b": jnp.ones((5, 7))}
  spec = jc.Spec([jc.Rule("a|b", [lowrank.svd(rank={"a": 2, "b": 4})])])
  t, _ = jax.eval_shape(spec.init, params)
  assert {k: v.params["lowrank"].u.shape for k, v in t.items()} == {"a": (8, 2), "b": (5, 4)}


def test_freeze_ranks_gives_the_same_factorization_under_tracing():
  params = jax.tree_util.tree_map(jnp.asarray, _budget_params())
  spec = jc.Spec([jc.Rule("l.", [lowrank.svd(budget=700)])])
  with pytest.raises(ValueError, match=r"'l0'.*concrete params.*freeze_ranks"):
    jax.eval_shape(spec.init, params)
  frozen = lowrank.freeze_ranks(spec, params)
  t_abs, _ = jax.eval_shape(frozen.init, params)
  t, s = spec.init(params)
  assert _ranks(t) == {k: v.params["lowrank"].u.shape[-1] for k, v in t_abs.items()}
  t2, s2 = jax.jit(frozen.init)(params)
  out, out2 = spec.apply(t, s), frozen.apply(t2, s2)
  for k in params:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(out2[k]), rtol=1e-4, atol=1e-4)
