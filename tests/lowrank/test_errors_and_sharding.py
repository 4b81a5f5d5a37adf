"""Bad input gets errors naming the leaf; factor shardings follow the kernel's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress import lowrank


def test_rank_above_full_rank_names_the_leaf():
  spec = jc.Spec([jc.Rule(r".*kernel", [lowrank.svd(rank=9)])])
  params = {"Dense_0": {"kernel": jnp.ones((16, 8))}}
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' of shape \(16, 8\) has full rank 8.*9.*\[1, 8\]"):
    spec.init(params)
  with pytest.raises(ValueError, match=r"'Dense_0/kernel'"):
    jax.eval_shape(spec.init, params)


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5, float("nan")])
def test_energy_outside_unit_interval(energy):
  with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
    lowrank.svd(energy=energy)


@pytest.mark.parametrize("fraction", [0.0, 1.01])
def test_fraction_outside_unit_interval(fraction):
  with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
    lowrank.svd(fraction=fraction)


def test_rank_and_budget_checks():
  with pytest.raises(ValueError, match="positive int"):
    lowrank.svd(rank=0)
  with pytest.raises(TypeError, match="positive int"):
    lowrank.svd(rank=2.5)
  with pytest.raises(ValueError, match="positive int"):
    lowrank.svd(budget=0)
  with pytest.raises(ValueError, match=r"exactly one of rank=, fraction=, energy=, budget=; got \['energy', 'rank'\]"):
    lowrank.svd(rank=4, energy=0.9)
  with pytest.raises(ValueError, match="got none"):
    lowrank.tucker2()
  with pytest.raises(TypeError, match=r"rank must be a rank rule such as lowrank.Fixed\(64\)"):
    lowrank.SVD(rank=4)


def test_budget_below_rank_one_cost_names_the_leaves():
  spec = jc.Spec([jc.Rule("a|b", [lowrank.svd(budget=20)])])
  with pytest.raises(ValueError, match=r"params=20 is below the 25 parameters.*\['a', 'b'\]"):
    spec.init({"a": jnp.ones((4, 6)), "b": jnp.ones((7, 8))})


def test_per_leaf_mapping_missing_a_leaf():
  spec = jc.Spec([jc.Rule("a|b", [lowrank.svd(rank={"a": 2})])])
  with pytest.raises(ValueError, match=r"no rank given for leaf 'b'"):
    spec.init({"a": jnp.ones((4, 6)), "b": jnp.ones((7, 8))})


def test_vector_leaf_and_pair_rank_for_svd():
  with pytest.raises(ValueError, match=r"SVD: leaf 'bias' has shape \(8,\)"):
    jc.Spec([jc.Rule("bias", [lowrank.svd(rank=1)])]).init({"bias": jnp.ones(8)})
  with pytest.raises(TypeError, match=r"SVD: rank \(2, 3\) is a pair of ranks \(r_in, r_out\), which is for Tucker2"):
    jc.Spec([jc.Rule("w", [lowrank.svd(rank=(2, 3))])]).init({"w": jnp.ones((4, 4))})


def test_energy_under_jit_explains_the_fix():
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(energy=0.9)])])
  with pytest.raises(ValueError, match=r"leaf 'w'.*needs concrete params.*freeze_ranks"):
    jax.jit(spec.init)({"w": jnp.ones((4, 4))})


def _mesh():
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def test_factor_shardings_keep_the_kernel_axes():
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(0)
  params = {
      "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)},
      "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)},
  }
  mesh = _mesh()
  p_sh = {
      "Dense_0": {"kernel": NamedSharding(mesh, P("data", "model"))},
      "Dense_1": {"kernel": NamedSharding(mesh, P("model", "data"))},
  }
  # The rank axis is replicated, also when a mesh axis divides the rank (DESIGN: U keeps
  # the input axis, V the output axis).
  spec = jc.Spec([jc.Rule(r".*kernel", [lowrank.svd(rank=4)])])
  t_sh, _ = spec.shardings(params, p_sh)
  f0, f1 = t_sh["Dense_0"]["kernel"].params["lowrank"], t_sh["Dense_1"]["kernel"].params["lowrank"]
  assert tuple(f0.u.spec) == ("data", None) and tuple(f0.v.spec) == (None, "model")
  assert tuple(f1.u.spec) == ("model", None) and tuple(f1.v.spec) == (None, "data")
  t_sh, s_sh = spec.shardings(params, p_sh)
  t, s = jax.jit(spec.init, out_shardings=(t_sh, s_sh))(jax.device_put(params, p_sh))
  assert t["Dense_0"]["kernel"].params["lowrank"].u.sharding.is_equivalent_to(f0.u, 2)
  assert t["Dense_1"]["kernel"].params["lowrank"].v.sharding.is_equivalent_to(f1.v, 2)
  sharded = jax.jit(spec.apply)(t, s)
  single = spec.apply(*spec.init(params))
  for k in params:
    np.testing.assert_allclose(
        np.asarray(sharded[k]["kernel"]), np.asarray(single[k]["kernel"]), rtol=1e-4, atol=1e-4
    )


def test_frozen_energy_spec_gives_shardings():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
  p_sh = {"w": NamedSharding(_mesh(), P(None, "model"))}
  spec = lowrank.freeze_ranks(jc.Spec([jc.Rule("w", [lowrank.svd(energy=0.5)])]), params)
  t_sh, _ = spec.shardings(params, p_sh)
  assert tuple(t_sh["w"].params["lowrank"].v.spec)[1] == "model"
  assert tuple(t_sh["w"].params["lowrank"].u.spec)[0] is None
