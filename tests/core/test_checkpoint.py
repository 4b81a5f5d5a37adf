"""jc.checkpoint: the whole train state saved and restored with Orbax, sharded,
resumed bit for bit, and checkpoints of another tree refused by path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc


def _params(seed=0, hidden=32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "l1": {"kernel": jax.random.normal(k1, (16, hidden)) * 0.3, "bias": jnp.zeros(hidden)},
      "l2": {"kernel": jax.random.normal(k2, (hidden, 8)) * 0.3, "bias": jnp.zeros(8)},
  }


def _loss(p, batch):
  x, y = batch
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batches(n):
  out = []
  for i in range(n):
    kx, _ = jax.random.split(jax.random.key(100 + i))
    out.append((jax.random.normal(kx, (32, 16)), jnp.arange(32) % 8))
  return out


PRUNE_QUANT = jc.Spec([
    jc.Rule(".*kernel", [
        jc.prune.magnitude(sparsity=jc.schedules.polynomial(0.0, 0.75, begin_step=0, end_step=6)),
        jc.quant.FakeQuant(bits=8),
    ])
])


def _pspecs():
  return {"l1": {"kernel": P(None, "model"), "bias": P("model")},
          "l2": {"kernel": P("model", None), "bias": P()}}


def _bits(x):
  """Raw bytes of an array, so that equality is bit for bit (-0.0 != 0.0, NaN == NaN)."""
  a = np.asarray(x)
  return a.reshape(-1).view(np.uint8) if a.dtype != np.bool_ else a


def assert_bit_identical(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(_bits(x), _bits(y))


# ----------------------------------------------------------------------------
# Cheap checks (the fast run): refusals.
# ----------------------------------------------------------------------------


def test_checkpoints_of_another_tree_are_refused_naming_the_first_path(tmp_path):
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}

  def target(spec=spec, opt=optax.adam(0.1), params=params):
    return jax.eval_shape(lambda: jc.init_train_state(spec, opt, params))

  # Zeros of the state's shapes: what is checked is the tree, not the values.
  ts = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), target())
  jc.checkpoint.save(tmp_path / "ckpt", ts)

  quant = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=8)])])
  with pytest.raises(ValueError, match=r"the target has 'spec_state/w/stages/quant' \(None\) "
                     r"where the checkpoint has 'spec_state/w/stages/prune' \(PruneState\)"):
    jc.checkpoint.restore(tmp_path / "ckpt", target(spec=quant))
  wide = {"w": jnp.ones((4, 8)), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"does not fit the target at 'trainable/w': the checkpoint "
                     r"holds float32\[4, 4\] there, the target float32\[4, 8\]"):
    jc.checkpoint.restore(tmp_path / "ckpt", target(params=wide))
  half = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"at 'trainable/w': the checkpoint holds float32\[4, 4\] "
                     r"there, the target bfloat16\[4, 4\]"):
    jc.checkpoint.restore(tmp_path / "ckpt", target(params=half))
  with pytest.raises(ValueError, match=r"at 'opt_state/0': the checkpoint holds ScaleByAdamState "
                     r"there, the target TraceState\. Build the target from the spec, optimizer"):
    jc.checkpoint.restore(tmp_path / "ckpt", target(opt=optax.sgd(0.1, momentum=0.9)))
  with pytest.raises(ValueError, match=r"at 'key': the checkpoint holds None there, the target uint32\[2\]"):
    jc.checkpoint.restore(
        tmp_path / "ckpt",
        jax.eval_shape(lambda: jc.init_train_state(spec, optax.adam(0.1), params, key=jax.random.key(0))),
    )
  # Same leaves, but owned by the second rule: a static field of the LeafState differs.
  two = jc.Spec([jc.Rule("b", [jc.prune.magnitude(sparsity=0.5)]), jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  with pytest.raises(ValueError, match=r"at 'spec_state/b': the checkpoint holds LeafState\(-1, None\) "
                     r"there, the target LeafState\(0, \(4,\)\)"):
    jc.checkpoint.restore(tmp_path / "ckpt", target(spec=two))


def test_bad_paths_keys_and_shardings_are_refused(tmp_path):
  ts = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="holds no checkpoint written by jc.checkpoint.save"):
    jc.checkpoint.restore(tmp_path / "missing", ts)
  jc.checkpoint.save(tmp_path / "ckpt", ts)
  with pytest.raises(ValueError, match="already exists. Pass overwrite=True to replace it"):
    jc.checkpoint.save(tmp_path / "ckpt", ts)
  with pytest.raises(TypeError, match="leaf 'key' is a typed PRNG key, which Orbax does not store"):
    jc.checkpoint.save(tmp_path / "k", {"key": jax.random.key(0)})
  with pytest.raises(ValueError, match="shardings does not have the structure of the target"):
    jc.checkpoint.restore(tmp_path / "ckpt", ts, shardings={"v": None})
  # overwrite replaces the values; the caller's arrays are untouched
  jc.checkpoint.save(tmp_path / "ckpt", {"w": jnp.full(3, 2.0)}, overwrite=True)
  back = jc.checkpoint.restore(tmp_path / "ckpt", ts)
  assert back["w"].tolist() == [2.0, 2.0, 2.0] and ts["w"].tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------
# Resume (slow): bit-identical training, sharded, onto other meshes.
# ----------------------------------------------------------------------------


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[: shape[0] * shape[1]])


def _sharded(spec, opt, params, mesh, key):
  p_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), _pspecs())
  ts_sh = jc.train_state_shardings(spec, opt, params, p_sh, key=key)
  batch_sh = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data")))
  step = jc.make_train_step(_loss, spec, opt, state_shardings=ts_sh, batch_sharding=batch_sh)
  return ts_sh, batch_sh, step


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  spec, opt = PRUNE_QUANT, optax.adam(1e-2)
  params, key = _params(), jax.random.key(7)
  mesh = _mesh((2, 4))
  ts_sh, batch_sh, step = _sharded(spec, opt, params, mesh, key)
  init = jax.jit(lambda p, k: jc.init_train_state(spec, opt, p, key=k), out_shardings=ts_sh)
  batches = [jax.device_put(b, batch_sh) for b in _batches(8)]

  straight = init(params, key)
  for b in batches:
    straight, _ = step(straight, b)

  ts = init(params, key)
  for b in batches[:3]:
    ts, _ = step(ts, b)
  # Async: training goes on (donating the state) while the files are written.
  pending = jc.checkpoint.save(tmp_path / "step3", ts, wait=False)
  saved = jax.tree_util.tree_map(np.array, ts)
  for b in batches[3:5]:
    ts, _ = step(ts, b)
  pending.wait()

  target = jax.eval_shape(lambda: jc.init_train_state(spec, opt, params, key=key))
  resumed = jc.checkpoint.restore(tmp_path / "step3", target, shardings=ts_sh)
  assert_bit_identical(resumed, saved)
  assert resumed.spec_state["l1"]["kernel"].stages["prune"].mask.sharding == ts_sh.spec_state["l1"]["kernel"].stages["prune"].mask
  assert int(resumed.step) == 3
  for b in batches[3:]:
    resumed, _ = step(resumed, b)
  assert_bit_identical(resumed, straight)
  model = spec.apply(resumed.trainable, resumed.spec_state)
  assert float(jnp.mean(model["l1"]["kernel"] == 0)) == 0.75


@pytest.mark.slow
def test_restore_onto_another_mesh_shape_and_one_device(tmp_path):
  spec = jc.Spec([
      jc.Rule("l1/kernel", [jc.lowrank.svd(rank=4), jc.quant.FakeQuant(bits=8)]),
      jc.Rule("l2/kernel", [jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=2)]),
  ])
  opt, params = optax.adam(1e-2), _params(1)
  ts_sh, _, _ = _sharded(spec, opt, params, _mesh((2, 4)), None)
  ts = jax.jit(lambda p: jc.init_train_state(spec, opt, p), out_shardings=ts_sh)(params)
  jc.checkpoint.save(tmp_path / "ckpt", ts)
  target = jax.eval_shape(lambda: jc.init_train_state(spec, opt, params))

  other_sh, _, _ = _sharded(spec, opt, params, _mesh((8, 1)), None)
  on_8x1 = jc.checkpoint.restore(tmp_path / "ckpt", target, shardings=other_sh)
  assert_bit_identical(on_8x1, ts)
  for a, s in zip(jax.tree_util.tree_leaves(on_8x1), jax.tree_util.tree_leaves(other_sh)):
    assert a.sharding == s
  assert on_8x1.trainable["l1"]["kernel"].params["lowrank"].u.sharding.spec == P(None, None)
  assert on_8x1.spec_state["l2"]["kernel"].stages["cluster"].assignments.dtype == jnp.uint8

  single = jc.checkpoint.restore(tmp_path / "ckpt", target)  # no shardings: the first device
  assert_bit_identical(single, ts)
  assert all(a.sharding.device_set == {jax.devices()[0]} for a in jax.tree_util.tree_leaves(single))
  # A concrete state as target: its shardings are used, its arrays left alone.
  like = jax.tree_util.tree_map(jnp.zeros_like, single)
  again = jc.checkpoint.restore(tmp_path / "ckpt", like)
  assert_bit_identical(again, ts)
  assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(like))
