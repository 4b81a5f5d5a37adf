"""The computations the multi-process tests run, written once for any number of processes.

Each scenario takes the global ``(2, 4)`` mesh ("data", "model") and a work
directory (shared by the processes), runs on global arrays, and returns its
results as numpy arrays gathered from every process. The workers run them on
2 processes x 4 CPU devices (``jax.distributed``); the tests run them again in
one process with 8 devices and compare.

Every step is waited for before the next one is dispatched: on CPU, the
cross-process collectives (gloo) of many queued steps can hang (measured:
after about 450 queued steps of a data-parallel step, 4 devices per process).

Data is loaded per process: every process can make the global batch (seeded
numpy), but feeds only the rows its own devices hold (``local_rows``), as in a
real input pipeline, through ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc

TRAIN_STEPS, SAVE_AT = 8, 4
DISTILL_STEPS = 5
CACHE_EXAMPLES, CACHE_K, CACHE_T, CACHE_BATCH = 40, 3, 2.0, 16


def make_mesh(shape=(2, 4)):
  """A global mesh whose axes work with unmodified model code (Auto, not Explicit)."""
  return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * len(shape))


def local_rows(sharding: NamedSharding, n: int) -> slice:
  """The rows of a global batch of ``n`` that this process's devices hold."""
  index = sharding.addressable_devices_indices_map((n,)).values()
  return slice(min(i[0].indices(n)[0] for i in index), max(i[0].indices(n)[1] for i in index))


def feed(sharding: NamedSharding, global_batch):
  """The global array of ``global_batch``, built from this process's rows only."""
  def one(x):
    rows = local_rows(sharding, x.shape[0])
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

  return jax.tree_util.tree_map(one, global_batch)


def fetch(tree):
  """Every array of ``tree`` as a full numpy array on every process."""
  return jax.tree_util.tree_map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def flat(prefix: str, tree) -> dict:
  """``{prefix/path: array}`` for the leaves of a pytree of numpy arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f"{prefix}/{jax.tree_util.keystr(k, simple=True, separator='/')}": v for k, v in leaves}


def mlp_params(seed: int, sizes) -> dict:
  rng = np.random.default_rng(seed)
  return {
      f"l{i}": {
          "kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
          "bias": (0.1 * rng.normal(size=(b,))).astype(np.float32),
      }
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def mlp(p, x):
  n = len(p)
  for i in range(n):
    x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def batches(seed: int, count: int, n: int, d: int, classes: int):
  rng = np.random.default_rng(seed)
  return [
      (rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, size=n).astype(np.int32))
      for _ in range(count)
  ]


# ----------------------------------------------------------------------------
# Compression-aware training with a checkpoint: stop, resume, other mesh.
# ----------------------------------------------------------------------------

TRAIN_SPEC = jc.Spec([
    jc.Rule(r"l\d/kernel", [
        jc.prune.magnitude(sparsity=jc.schedules.polynomial(0.0, 0.75, begin_step=0, end_step=6)),
        jc.quant.FakeQuant(bits=8),
    ])
])


def _train_setup(mesh):
  params = mlp_params(0, (16, 64, 8))
  pspecs = {"l0": {"kernel": P(None, "model"), "bias": P("model")},
            "l1": {"kernel": P("model", None), "bias": P()}}
  p_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), pspecs)
  opt, key = optax.adam(1e-2), jax.random.key(7)
  ts_sh = jc.train_state_shardings(TRAIN_SPEC, opt, params, p_sh, key=key)
  return params, opt, key, ts_sh


def _loss(p, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp(p, x), y).mean()


def train(mesh, workdir: str) -> dict:
  params, opt, key, ts_sh = _train_setup(mesh)
  batch_sh = NamedSharding(mesh, P("data"))
  step = jc.make_train_step(_loss, TRAIN_SPEC, opt, state_shardings=ts_sh, batch_sharding=batch_sh)
  init = jax.jit(lambda p, k: jc.init_train_state(TRAIN_SPEC, opt, p, key=k), out_shardings=ts_sh)
  data = batches(1, TRAIN_STEPS, 32, 16, 8)

  ts, losses = init(params, key), []
  for i, b in enumerate(data):
    if i == SAVE_AT:  # async: the next steps run (donating the state) while it is written
      pending = jc.checkpoint.save(os.path.join(workdir, "train_ckpt"), ts, overwrite=True, wait=False)
      at_save = fetch(ts)
    ts, m = step(ts, feed(batch_sh, b))
    jax.block_until_ready(ts)
    losses.append(m["loss"])
  pending.wait()
  straight = fetch(ts)

  target = jax.eval_shape(lambda: jc.init_train_state(TRAIN_SPEC, opt, params, key=key))
  resumed = jc.checkpoint.restore(os.path.join(workdir, "train_ckpt"), target, shardings=ts_sh)
  for b in data[SAVE_AT:]:
    resumed, _ = step(resumed, feed(batch_sh, b))
    jax.block_until_ready(resumed)

  other = make_mesh((4, 2))
  _, _, _, other_sh = _train_setup(other)
  on_4x2 = jc.checkpoint.restore(os.path.join(workdir, "train_ckpt"), target, shardings=other_sh)
  mask = on_4x2.spec_state["l0"]["kernel"].stages["prune"].mask
  return {
      "losses": np.asarray(fetch(jnp.stack(losses))),
      **flat("straight", straight),
      **flat("resumed", fetch(resumed)),
      **flat("at_save", at_save),
      **flat("on_4x2", fetch(on_4x2)),
      "on_4x2_mask_spec": np.array(str(mask.sharding.spec)),
  }


# ----------------------------------------------------------------------------
# Distillation: an FSDP teacher, a data-parallel pruned student.
# ----------------------------------------------------------------------------

STUDENT_SPEC = jc.Spec([jc.Rule(r"l\d/kernel", [jc.prune.magnitude(sparsity=0.5)])])
TEACHER_SIZES, STUDENT_SIZES = (16, 128, 10), (16, 32, 10)
ALL = ("data", "model")  # both mesh axes: 8 shards


def teacher_shardings(mesh, teacher):
  """FSDP: every kernel split over all 8 devices along its first axis; biases replicated."""
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, P(ALL, None) if x.ndim == 2 else P()), teacher
  )


def _distill_loss(p, batch, teacher_logits, step):
  del step
  return jc.distill.soft_target_loss(mlp(p, batch[0]), teacher_logits, temperature=2.0).mean()


def distill(mesh, workdir: str) -> dict:
  del workdir
  teacher = mlp_params(1, TEACHER_SIZES)
  t_sh = teacher_shardings(mesh, teacher)
  teacher = jax.device_put(teacher, t_sh)  # every process holds the same numpy params
  student = mlp_params(2, STUDENT_SIZES)
  replicated = NamedSharding(mesh, P())
  opt = optax.adam(5e-3)
  ts_sh = jc.train_state_shardings(
      STUDENT_SPEC, opt, student, jax.tree_util.tree_map(lambda _: replicated, student)
  )
  batch_sh = NamedSharding(mesh, P(ALL))  # data parallel over all 8 devices
  step = jc.distill.make_distill_step(
      _distill_loss, lambda tp, b: mlp(tp, b[0]), STUDENT_SPEC, opt,
      state_shardings=ts_sh, teacher_shardings=t_sh, batch_sharding=batch_sh,
  )
  ts = jax.jit(lambda p: jc.init_train_state(STUDENT_SPEC, opt, p), out_shardings=ts_sh)(student)
  losses = []
  for b in batches(3, DISTILL_STEPS, 64, 16, 10):
    ts, m = step(ts, teacher, feed(batch_sh, b))
    jax.block_until_ready(ts)
    losses.append(m["loss"])
  assert teacher["l0"]["kernel"].sharding.spec == P(ALL, None)
  return {"losses": np.asarray(fetch(jnp.stack(losses))), **flat("student", fetch(ts))}


# ----------------------------------------------------------------------------
# Stage inits on a sharded kernel: low-rank (randomized SVD) and k-means.
# ----------------------------------------------------------------------------

LOWRANK_RANK = 4
LOWRANK_SPEC = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=LOWRANK_RANK)])])
KMEANS_SPEC = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=3)])])


def sharded_kernel(mesh, shape, seed):
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  sh = {"w": NamedSharding(mesh, P("data", "model"))}
  return {"w": w}, sh


def lowrank(mesh, workdir: str) -> dict:
  del workdir
  params, p_sh = sharded_kernel(mesh, (64, 48), 4)
  t_sh, s_sh = LOWRANK_SPEC.shardings(params, p_sh)
  t, _ = jax.jit(LOWRANK_SPEC.init, out_shardings=(t_sh, s_sh))(jax.device_put(params, p_sh))
  f = t["w"].params["lowrank"]
  return {"w": params["w"], "u": fetch(f.u), "v": fetch(f.v), "u_spec": np.array(str(f.u.sharding.spec))}


def kmeans(mesh, workdir: str) -> dict:
  del workdir
  params, p_sh = sharded_kernel(mesh, (64, 48), 5)
  t_sh, s_sh = KMEANS_SPEC.shardings(params, p_sh)
  t, s = jax.jit(KMEANS_SPEC.init, out_shardings=(t_sh, s_sh))(jax.device_put(params, p_sh))
  st = s["w"].stages["cluster"]
  return {
      "w": params["w"],
      "centroids": fetch(t["w"].params["cluster"]),
      "assignments": fetch(st.assignments),
      "assignments_spec": np.array(str(st.assignments.sharding.spec)),
  }


# ----------------------------------------------------------------------------
# The offline top-k cache: written by every process, read globally, trained from.
# ----------------------------------------------------------------------------


def cache(mesh, workdir: str) -> dict:
  teacher = mlp_params(1, TEACHER_SIZES)
  t_sh = teacher_shardings(mesh, teacher)
  teacher = jax.device_put(teacher, t_sh)
  x = np.random.default_rng(6).normal(size=(CACHE_EXAMPLES, 16)).astype(np.float32)
  directory = os.path.join(workdir, "topk_cache")
  batch_sh = NamedSharding(mesh, P("data"))
  apply = jax.jit(mlp)  # the params are an argument: they span both processes' devices
  c = jc.distill.write_topk_cache(
      directory, lambda b: apply(teacher, b), x, k=CACHE_K, temperature=CACHE_T,
      batch_size=CACHE_BATCH, batch_sharding=batch_sh,
  )
  # Reading is global: every process opens the whole cache and reads its rows of a batch.
  c = jc.distill.load_topk_cache(directory, k=CACHE_K, vocab_size=TEACHER_SIZES[-1], temperature=CACHE_T)
  student = mlp_params(2, STUDENT_SIZES)
  opt = optax.sgd(0.1)
  replicated = NamedSharding(mesh, P())
  ts_sh = jc.train_state_shardings(
      jc.Spec([]), opt, student, jax.tree_util.tree_map(lambda _: replicated, student)
  )

  def loss_fn(p, batch, topk, step):
    del step
    return jc.distill.topk_distillation_loss(mlp(p, batch["x"]), *topk, temperature=CACHE_T).mean()

  step = jc.distill.make_distill_step(
      loss_fn, lambda _, b: b["topk"], jc.Spec([]), opt, state_shardings=ts_sh, batch_sharding=batch_sh
  )
  ts = jax.jit(lambda p: jc.init_train_state(jc.Spec([]), opt, p), out_shardings=ts_sh)(student)
  order = np.random.default_rng(7).permutation(CACHE_EXAMPLES)
  losses = []
  for i in range(2):
    ids = np.sort(order[i * 16 : (i + 1) * 16])
    rows = local_rows(batch_sh, len(ids))
    local = {"x": x[ids[rows]], "topk": c.topk(ids[rows])}  # only this process's rows are read
    batch = jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(batch_sh, a, (len(ids),) + a.shape[1:]), local
    )
    ts, m = step(ts, None, batch)
    jax.block_until_ready(ts)
    losses.append(m["loss"])
  with open(os.path.join(directory, "meta.json")) as f:
    meta = f.read()
  return {
      "x": x,
      "values": np.array(c.values),
      "indices": np.array(c.indices),
      "logsumexp": np.array(c.logsumexp),
      "meta": np.array(meta),
      "losses": np.asarray(fetch(jnp.stack(losses))),
      **flat("student", fetch(ts.trainable)),
  }


SCENARIOS = {"train": train, "distill": distill, "lowrank": lowrank, "kmeans": kmeans, "cache": cache}


def run_all(mesh, workdir: str, names=None) -> dict:
  """``{scenario/name: array}`` for the scenarios asked for (all by default)."""
  out = {}
  for name in names or SCENARIOS:
    for key, value in SCENARIOS[name](mesh, workdir).items():
      out[f"{name}/{key}"] = value
  return out
