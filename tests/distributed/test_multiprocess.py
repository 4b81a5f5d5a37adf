"""Two processes x 4 CPU devices on jax.distributed give what one process with 8 devices gives.

The workers (``tests/distributed/worker.py``) run the scenarios of
``scenarios.py`` on a global 2x4 mesh, one mesh row per process, each process
feeding only its own rows of every batch; this test process runs the same
scenarios on its own 8 devices and compares.

Exact (bit for bit) across the two runs: integers and booleans (steps, pruning
masks, k-means assignments, top-k indices), the training losses, the k-means
centroids, the top-k cache (written by two processes, each its own rows) and
the training from it. Equal to float tolerance: the float training state of the
compression-aware and the distillation runs, and the low-rank factors. Their
gradients and products are summed across the two processes by gloo, in another
order than one process's in-memory all-reduce: a few float32 ulps, which
training then carries along.

Within the two-process run, everything about checkpoints is exact: a run
stopped, saved (asynchronously, training going on) and resumed equals the
uninterrupted run bit for bit, and a restore onto a 4x2 mesh, or in this
process onto 8 devices, gives back the saved arrays bit for bit.
"""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
from tests.distributed import scenarios
from tests.distributed.launch import run_workers

pytestmark = pytest.mark.slow

FLOAT_TOL = {"rtol": 1e-5, "atol": 1e-8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  work = tmp_path_factory.mktemp("distributed")
  multi = run_workers(work / "multi", processes=2, timeout=900)
  single = scenarios.run_all(scenarios.make_mesh(), str(work / "single"))
  return work, multi, single


def _bits(a):
  a = np.asarray(a)
  return a.reshape(-1).view(np.uint8) if a.dtype.kind in "fc" else a


def assert_exact(a, b, what=""):
  assert a.dtype == b.dtype and a.shape == b.shape, what
  np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=what)


def keys(results, prefix):
  return sorted(k for k in results if k.startswith(prefix))


def test_each_process_holds_one_mesh_row_and_both_see_the_same_results(runs):
  _, (p0, p1), single = runs
  np.testing.assert_array_equal(p0["devices"], [[0, 0, 0, 0], [1, 1, 1, 1]])
  assert sorted(p0) == sorted(p1) and set(single) == set(p0) - {"devices"}
  for k in p0:
    assert_exact(p0[k], p1[k], k)


def test_compression_aware_training_equals_one_process(runs):
  _, (multi, _), single = runs
  assert_exact(multi["train/losses"], single["train/losses"])
  for k in keys(single, "train/straight/"):
    if single[k].dtype.kind == "f":
      np.testing.assert_allclose(multi[k], single[k], err_msg=k, **FLOAT_TOL)
    else:  # step, masks, key
      assert_exact(multi[k], single[k], k)
  mask = multi["train/straight/spec_state/l0/kernel/stages/prune/mask"]
  assert mask.mean() == 0.25  # the schedule's final 75% sparsity, exactly
  # int8 fake quantization: at most 255 levels per kernel in the model params.
  w = multi["train/straight/trainable/l0/kernel"] * mask
  assert len(np.unique(np.round(w / np.abs(w).max() * 127))) <= 255


def test_stop_and_resume_is_bit_identical_with_two_processes(runs):
  work, (multi, _), _ = runs
  for k in keys(multi, "train/straight/"):
    assert_exact(multi[k.replace("straight", "resumed")], multi[k], k)
  # Restored onto a 4x2 mesh: the saved arrays, bit for bit, in the new layout.
  for k in keys(multi, "train/at_save/"):
    assert_exact(multi[k.replace("at_save", "on_4x2")], multi[k], k)
  assert str(multi["train/on_4x2_mask_spec"]) == "P(None, 'model')"
  assert int(multi["train/at_save/step"]) == scenarios.SAVE_AT

  # The checkpoint two processes wrote, restored by this one process onto a 1x8 mesh.
  params, opt, key, _ = scenarios._train_setup(scenarios.make_mesh())
  mesh = scenarios.make_mesh((1, 8))
  _, _, _, sh = scenarios._train_setup(mesh)
  target = jax.eval_shape(lambda: jc.init_train_state(scenarios.TRAIN_SPEC, opt, params, key=key))
  ts = jc.checkpoint.restore(work / "multi" / "train_ckpt", target, shardings=sh)
  restored = scenarios.flat("train/at_save", jax.tree_util.tree_map(np.asarray, ts))
  for k, v in restored.items():
    assert_exact(v, multi[k], k)
  assert ts.trainable["l0"]["kernel"].sharding == NamedSharding(mesh, P(None, "model"))


def test_distillation_with_an_fsdp_teacher_equals_one_process(runs):
  _, (multi, _), single = runs
  np.testing.assert_allclose(multi["distill/losses"], single["distill/losses"], rtol=1e-6)
  for k in keys(single, "distill/student/"):
    if single[k].dtype.kind == "f":
      np.testing.assert_allclose(multi[k], single[k], err_msg=k, **FLOAT_TOL)
    else:
      assert_exact(multi[k], single[k], k)
  losses = multi["distill/losses"]
  assert losses[-1] < losses[0]
  assert multi["distill/student/spec_state/l0/kernel/stages/prune/mask"].mean() == 0.5


def test_lowrank_init_of_a_sharded_kernel(runs):
  _, (multi, _), single = runs
  w = multi["lowrank/w"].astype(np.float64)
  uv = multi["lowrank/u"].astype(np.float64) @ multi["lowrank/v"].astype(np.float64)
  uv_single = single["lowrank/u"].astype(np.float64) @ single["lowrank/v"].astype(np.float64)
  assert np.linalg.norm(uv - uv_single) <= 1e-5 * np.linalg.norm(uv_single)
  # Eckart-Young: the best rank-r error, from numpy's float64 SVD.
  s = np.linalg.svd(w, compute_uv=False)
  optimal = np.sqrt(np.sum(s[scenarios.LOWRANK_RANK :] ** 2))
  assert np.linalg.norm(w - uv) <= 1.0001 * optimal
  assert str(multi["lowrank/u_spec"]) == "P('data', None)"


def test_kmeans_init_of_a_sharded_kernel_is_exact(runs):
  _, (multi, _), single = runs
  for k in ("kmeans/centroids", "kmeans/assignments"):
    assert_exact(multi[k], single[k], k)
  w = multi["kmeans/w"].astype(np.float64)
  c = multi["kmeans/centroids"].astype(np.float64)
  a = multi["kmeans/assignments"].astype(np.int64)
  # A Lloyd fixed point: each weight sits with its nearest centroid, each
  # centroid is the mean of its weights.
  dist = np.abs(w[..., None] - c)
  np.testing.assert_allclose(np.take_along_axis(dist, a[..., None], -1)[..., 0], dist.min(-1), atol=1e-6)
  for j in np.unique(a):
    np.testing.assert_allclose(c[j], w[a == j].mean(), rtol=1e-5, atol=1e-6)
  assert str(multi["kmeans/assignments_spec"]) == "P('data', 'model')"


def test_topk_cache_written_by_two_processes_is_read_globally(runs):
  _, (multi, _), single = runs
  for k in keys(single, "cache/"):
    if k != "cache/meta":
      assert_exact(multi[k], single[k], k)
  meta = json.loads(str(multi["cache/meta"]))
  assert meta["processes"] == 2 and meta["num_examples"] == scenarios.CACHE_EXAMPLES
  # Against numpy float64 on the teacher's logits.
  teacher = scenarios.mlp_params(1, scenarios.TEACHER_SIZES)
  x = multi["cache/x"].astype(np.float64)
  h = np.maximum(x @ teacher["l0"]["kernel"] + teacher["l0"]["bias"], 0)
  z = h @ teacher["l1"]["kernel"].astype(np.float64) + teacher["l1"]["bias"]
  idx = np.argsort(-z, axis=-1)[:, : scenarios.CACHE_K]
  np.testing.assert_array_equal(multi["cache/indices"], idx)
  np.testing.assert_allclose(multi["cache/values"], np.take_along_axis(z, idx, -1), rtol=1e-5, atol=1e-5)
  lse = np.log(np.exp(z / scenarios.CACHE_T).sum(-1))
  np.testing.assert_allclose(multi["cache/logsumexp"], lse, rtol=1e-5)
  assert np.all(np.isfinite(multi["cache/losses"])) and multi["cache/losses"][0] > 0
