"""``jaxcompress demo``: every technique on one model, compared by its real file.

A float MLP 64-512-256-10 (Flax linen, ReLU) is trained on scikit-learn's 8x8
digits (1797 images; a stratified 75/25 split drawn from ``--seed``). Then each
technique compresses it through the public API (each stage starts from the
float model unless it says otherwise):

- gradual magnitude pruning to 90% (Zhu & Gupta's cubic schedule), then
  fine-tuning with the masks fixed;
- 2:4 sparsity (``prune.NM(2, 4)``), fine-tuned;
- int8 and int4 quantization-aware training (``quant.FakeQuant``, one scale
  per output channel);
- GPTQ int4, post-training, from 256 training images, layer by layer
  (``jc.quant.gptq`` through the recipe machinery of ``jaxcompress compress``);
- low-rank: truncated SVD of the two hidden kernels at a quarter of their
  rank, the factors fine-tuned;
- k-means weight sharing, 16 shared values per kernel (4-bit indices), the
  centroids fine-tuned, Huffman-coded;
- distillation into a student 64-64-10 (Hinton's soft targets);
- 2:4 then int8 (the 2:4 model quantization-aware fine-tuned), a combined
  pipeline;
- Deep Compression: the 90%-pruned model clustered (32 values per kernel;
  k-means leaves the zeros out and they stay zero), the centroids
  fine-tuned, Huffman-coded.

Every result is exported (``jc.export.export``), saved (``jc.export.save``, one
safetensors file) and loaded back; accuracy is that of the loaded file, bytes
are the file's size on disk, compared with the float model saved the same way.
Latency is one forward pass over the test set (450 images), from the loaded
file: int8/int4 kernels run on their codes (``jc.export.serving_params`` with
``compressed_dense``), low-rank kernels as their two factors
(``jc.lowrank.factorized_params`` with ``factorized_dense``; the factors are
checked to multiply out to the loaded kernel bit for bit), the student as the
smaller model, and the others (sparse or clustered, which save bytes but not
time on a CPU) from their decoded weights. Each is timed against the float
forward in the same rounds (shuffled order, one untimed call, then a block of
timed calls); the figure is the median over rounds of float time / its time.

Writes, in ``--out``: ``artifacts/*.safetensors``, ``results.json``,
``demo.png`` (accuracy against bytes on disk, the Pareto front marked),
``report.md`` (the table, the plot and the exact settings), and the float
model as an Orbax checkpoint (``checkpoint/``) with the GPTQ calibration
inputs (``calib.npy``), ready for ``jaxcompress compress``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.cli import oneshot
from jaxcompress.cli.recipe import parse_recipe

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every setting of a demo run (written into the report).

  ``fast=True`` shrinks the training steps and timing rounds for a smoke run.
  """

  seed: int = 0
  fast: bool = False
  features: tuple[int, ...] = (512, 256, 10)
  student_features: tuple[int, ...] = (64, 10)
  batch: int = 128
  float_steps: int = 2000
  float_lr: float = 1e-3
  prune_sparsity: float = 0.9
  prune_steps: int = 1000
  prune_update_every: int = 25
  prune_finetune_steps: int = 500
  nm_steps: int = 500
  int8_steps: int = 300
  int4_steps: int = 600
  qat_lr: float = 3e-4
  gptq_bits: int = 4
  gptq_calibration: int = 256
  svd_fraction: float = 0.25
  svd_steps: int = 600
  kmeans_bits: int = 4
  kmeans_steps: int = 400
  centroid_lr: float = 1e-3
  distill_steps: int = 3000
  distill_lr: float = 3e-3
  distill_temperature: float = 4.0
  distill_alpha: float = 0.9
  nm_int8_steps: int = 300
  dc_bits: int = 5
  dc_steps: int = 500
  finetune_lr: float = 5e-4
  latency_rounds: int = 30
  latency_block: int = 10

  @classmethod
  def make(cls, seed: int = 0, fast: bool = False) -> "Settings":
    """The default settings, or the smoke-run ones with ``fast``."""
    if not fast:
      return cls(seed=seed)
    return cls(
        seed=seed, fast=True, float_steps=200, prune_steps=40, prune_update_every=10,
        prune_finetune_steps=20, nm_steps=20, int8_steps=20, int4_steps=20, svd_steps=20,
        kmeans_steps=20, distill_steps=60, nm_int8_steps=20, dc_steps=20, latency_rounds=3,
        latency_block=2,
    )


class MLP(nn.Module):
  """Dense layers with ReLU between them."""

  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


@dataclasses.dataclass
class Result:
  """One row of the table."""

  key: str
  technique: str
  accuracy: float
  file_bytes: int
  inference: str
  steps: int
  seconds: float
  file: str
  runner: Callable[[], Any] | None = None
  extra: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------
# Data, training, evaluation.
# --------------------------------------------------------------------------


def load_digits(seed: int):
  """The digits split 75/25, stratified, by ``seed``: ``(x_train, x_test, y_train, y_test)``."""
  from sklearn.datasets import load_digits as sk_digits
  from sklearn.model_selection import train_test_split

  digits = sk_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


class Batches:
  """Mini-batches of the training set: a reshuffled pass after another, from a seed."""

  def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    self.x, self.y, self.batch = x, y, batch
    self.rng = np.random.default_rng(seed)
    self.order = np.empty(0, np.int64)

  def next(self) -> tuple[np.ndarray, np.ndarray]:
    if self.order.size < self.batch:
      self.order = np.concatenate([self.order, self.rng.permutation(len(self.x))])
    idx, self.order = self.order[: self.batch], self.order[self.batch :]
    return self.x[idx], self.y[idx]


class Demo:
  """One run: the data, the models, the progress display and the results."""

  def __init__(self, settings: Settings, out: pathlib.Path, progress):
    self.s = settings
    self.out = out
    self.progress = progress
    self.x_train, self.x_test, self.y_train, self.y_test = load_digits(settings.seed)
    self.model = MLP(settings.features)
    self.student = MLP(settings.student_features)
    self.results: list[Result] = []
    self._stage = 0
    self._accuracy: dict[tuple[int, ...], Callable] = {}

  # ----- helpers -----------------------------------------------------------
  def accuracy(self, model: MLP, params: PyTree) -> float:
    """Test accuracy of ``params`` (one jitted function per model)."""
    if model.features not in self._accuracy:
      self._accuracy[model.features] = jax.jit(
          lambda p, x, y: jnp.mean(jnp.argmax(model.apply({"params": p}, x), -1) == y)
      )
    return float(self._accuracy[model.features](params, self.x_test, self.y_test))

  def loss_fn(self, model: nn.Module):
    def loss(params, batch):
      x, y = batch
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    return loss

  def batches(self) -> Batches:
    self._stage += 1
    return Batches(self.x_train, self.y_train, self.s.batch, self.s.seed * 1000 + self._stage)

  def task(self, name: str, total: int):
    return self.progress.add_task(name, total=total, loss="")

  def fit(self, name: str, spec: jc.Spec, params: PyTree, steps: int, lr, *, model=None) -> jc.TrainState:
    """``steps`` Adam steps of the spec's compression-aware training."""
    model = self.model if model is None else model
    optimizer = optax.adam(lr)
    ts = jc.init_train_state(spec, optimizer, params)
    step = jc.make_train_step(self.loss_fn(model), spec, optimizer)
    data, task = self.batches(), self.task(name, steps)
    for i in range(steps):
      ts, metrics = step(ts, data.next())
      if i % 10 == 9 or i == steps - 1:
        self.progress.update(task, completed=i + 1, loss=f"{float(metrics['loss']):.4f}")
    return ts

  def float_params(self) -> PyTree:
    params = self.model.init(jax.random.key(self.s.seed), self.x_train[:1])["params"]
    ts = self.fit("float baseline", jc.Spec([]), params, self.s.float_steps, self.s.float_lr)
    return ts.trainable

  # ----- the file, its accuracy and its forward ----------------------------
  def record(self, key: str, technique: str, spec: jc.Spec, trainable, state, *, steps: int,
             t0: float, huffman: bool = False, model=None, inference: str = "decoded",
             extra: dict | None = None) -> Result:
    """Exports, saves and loads back; accuracy and the forward come from the loaded file."""
    model = self.model if model is None else model
    path = self.out / "artifacts" / f"{key}.safetensors"
    artifact = jc.export.export(spec, trainable, state, huffman=huffman)
    saved = jc.export.save(artifact, path)
    like = jax.eval_shape(lambda: spec.apply(trainable, state))
    loaded = jc.export.load(path, like=like)
    params = jc.export.decode(loaded)
    label = _INFERENCE[inference]
    if inference == "codes":
      served = jc.export.serving_params(loaded)
      widths = sorted({r.encoding.split(" ")[0] for r in loaded.records if r.path.endswith("kernel")})
      label = " and ".join(f"{w} codes" for w in widths) + " (compressed_dense)"

      def forward(p, x):
        with jc.export.compressed_dense():
          return model.apply({"params": p}, x)
    elif inference == "factors":
      served = jc.lowrank.factorized_params(spec, trainable, state)
      _check_factors(served, params)

      def forward(p, x):
        with jc.lowrank.factorized_dense():
          return model.apply({"params": p}, x)
    else:
      served = params

      def forward(p, x):
        return model.apply({"params": p}, x)
    fn, x = jax.jit(forward), jnp.asarray(self.x_test)
    runner = lambda: fn(served, x).block_until_ready()  # the weights are arguments, never folded
    result = Result(
        key, technique, self.accuracy(model, params), saved.nbytes, label, steps,
        time.perf_counter() - t0, str(path.relative_to(self.out)), runner, extra or {},
    )
    self.results.append(result)
    return result

  # ----- the techniques ----------------------------------------------------
  def run(self) -> None:
    s, kernels = self.s, r".*kernel"
    t0 = time.perf_counter()
    dense = self.float_params()
    self.record("float32", "float32 (baseline)", jc.Spec([]), dense, jc.Spec([]).init(dense)[1],
                steps=s.float_steps, t0=t0)
    self.save_for_compress(dense)

    # Gradual magnitude pruning, then fine-tuning with the masks fixed.
    t0 = time.perf_counter()
    schedule = jc.schedules.polynomial(0.0, s.prune_sparsity, begin_step=0, end_step=s.prune_steps, power=3.0)
    prune = jc.prune.magnitude(sparsity=schedule, end_step=s.prune_steps + 1, update_every=s.prune_update_every)
    spec = jc.Spec([jc.Rule(kernels, [prune])])
    steps = s.prune_steps + s.prune_finetune_steps
    ts = self.fit(f"prune {s.prune_sparsity:.0%}", spec, dense, steps, s.finetune_lr)
    pruned = self.record("magnitude", f"magnitude pruning {s.prune_sparsity:.0%}", spec, ts.trainable,
                         ts.spec_state, steps=steps, t0=t0)
    pruned_params = jc.export.decode(jc.export.load(self.out / pruned.file, like=dense))

    # 2:4 sparsity, fine-tuned.
    t0 = time.perf_counter()
    spec = jc.Spec([jc.Rule(kernels, [jc.prune.Prune(structure=jc.prune.NM(2, 4))])])
    ts = self.fit("2:4 sparsity", spec, dense, s.nm_steps, s.finetune_lr)
    nm = self.record("nm24", "2:4 sparsity", spec, ts.trainable, ts.spec_state, steps=s.nm_steps, t0=t0)
    nm_params = jc.export.decode(jc.export.load(self.out / nm.file, like=dense))

    # Quantization-aware training, int8 and int4.
    for bits, steps in ((8, s.int8_steps), (4, s.int4_steps)):
      t0 = time.perf_counter()
      spec = jc.Spec([jc.Rule(kernels, [jc.quant.FakeQuant(bits=bits)])])
      ts = self.fit(f"int{bits} QAT", spec, dense, steps, s.qat_lr)
      self.record(f"int{bits}_qat", f"int{bits} QAT", spec, ts.trainable, ts.spec_state, steps=steps,
                  t0=t0, inference="codes")

    # GPTQ: post-training, from calibration inputs, through the compress command's code.
    t0 = time.perf_counter()
    task = self.task(f"GPTQ int{s.gptq_bits}", 1)
    recipe = parse_recipe(
        f'[[rules]]\npattern = "{kernels}"\nstages = [{{ stage = "quant.gptq", bits = {s.gptq_bits} }}]\n',
        "<demo gptq recipe>",
    )
    spec, t, st = oneshot.compress(dense, recipe, np.load(self.out / "calib.npy"))
    self.progress.update(task, completed=1)
    self.record("gptq", f"GPTQ int{s.gptq_bits} (post-training)", spec, t, st, steps=0, t0=t0,
                inference="codes", extra={"recipe": recipe.text})

    # Low-rank factors of the hidden kernels, fine-tuned.
    t0 = time.perf_counter()
    spec = jc.Spec([jc.Rule(r"Dense_[01]/kernel", [jc.lowrank.svd(fraction=s.svd_fraction)])])
    ts = self.fit("low-rank SVD", spec, dense, s.svd_steps, s.finetune_lr)
    ranks = {k: int(v["kernel"].params["lowrank"].rank) for k, v in ts.trainable.items()
             if isinstance(v["kernel"], jc.Compressed)}
    self.record("svd", f"low-rank SVD ({s.svd_fraction:g} of full rank)", spec, ts.trainable,
                ts.spec_state, steps=s.svd_steps, t0=t0, inference="factors", extra={"ranks": ranks})

    # k-means weight sharing with Huffman coding, the centroids fine-tuned.
    t0 = time.perf_counter()
    spec = jc.Spec([jc.Rule(kernels, [jc.cluster.kmeans(bits=s.kmeans_bits)])])
    ts = self.fit(f"k-means {2 ** s.kmeans_bits}", spec, dense, s.kmeans_steps, s.centroid_lr)
    self.record("kmeans", f"k-means {2 ** s.kmeans_bits} values + Huffman", spec, ts.trainable,
                ts.spec_state, steps=s.kmeans_steps, t0=t0, huffman=True)

    # Distillation into a smaller student.
    t0 = time.perf_counter()
    student = self.distill(dense)
    self.record("distill", f"distilled student 64-{'-'.join(map(str, s.student_features))}",
                jc.Spec([]), student, jc.Spec([]).init(student)[1], steps=s.distill_steps, t0=t0,
                model=self.student)

    # Combined: the 2:4 model, int8 quantization-aware fine-tuned.
    t0 = time.perf_counter()
    spec = jc.Spec([
        jc.Rule(kernels, [jc.prune.Prune(structure=jc.prune.NM(2, 4)), jc.quant.FakeQuant(bits=8)]),
    ])
    ts = self.fit("2:4 + int8", spec, nm_params, s.nm_int8_steps, s.qat_lr)
    self.record("nm24_int8", "2:4 + int8 QAT", spec, ts.trainable, ts.spec_state,
                steps=s.nm_steps + s.nm_int8_steps, t0=t0, inference="codes")

    # Deep Compression: the pruned model clustered, centroids fine-tuned, Huffman-coded.
    # Clustering leaves zeros out of k-means and keeps them exactly zero, so the pruned
    # weights stay pruned without a pruning stage (whose selection would compile again).
    t0 = time.perf_counter()
    spec = jc.Spec([jc.Rule(kernels, [jc.cluster.kmeans(bits=s.dc_bits)])])
    ts = self.fit("Deep Compression", spec, pruned_params, s.dc_steps, s.centroid_lr)
    self.record("deep_compression", f"Deep Compression (prune {s.prune_sparsity:.0%}, "
                f"{2 ** s.dc_bits} values, Huffman)", spec, ts.trainable, ts.spec_state,
                steps=s.prune_steps + s.prune_finetune_steps + s.dc_steps, t0=t0, huffman=True)

  def save_for_compress(self, params: PyTree) -> None:
    """The float params as an Orbax checkpoint and calibration inputs, for ``jaxcompress compress``."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save((self.out / "checkpoint").absolute(), params, force=True)
    ckpt.wait_until_finished()
    order = np.random.default_rng(self.s.seed).permutation(len(self.x_train))
    np.save(self.out / "calib.npy", self.x_train[order[: self.s.gptq_calibration]])

  def distill(self, teacher: PyTree) -> PyTree:
    s = self.s
    params = self.student.init(jax.random.key(s.seed + 1), self.x_train[:1])["params"]
    spec, optimizer = jc.Spec([]), optax.adam(s.distill_lr)
    model = self.student

    def loss_fn(p, batch, teacher_logits, step):
      x, y = batch
      return jc.distill.distillation_loss(
          model.apply({"params": p}, x), teacher_logits, y, alpha=s.distill_alpha,
          temperature=s.distill_temperature,
      ).mean()

    teacher_fn = lambda p, batch: self.model.apply({"params": p}, batch[0])
    ts = jc.init_train_state(spec, optimizer, params)
    step = jc.distill.make_distill_step(loss_fn, teacher_fn, spec, optimizer)
    data, task = self.batches(), self.task("distillation", s.distill_steps)
    for i in range(s.distill_steps):
      ts, metrics = step(ts, teacher, data.next())
      if i % 10 == 9 or i == s.distill_steps - 1:
        self.progress.update(task, completed=i + 1, loss=f"{float(metrics['loss']):.4f}")
    return ts.trainable

  # ----- latency -----------------------------------------------------------
  def time_all(self) -> None:
    """Paired timings: every forward against the float one, in the same shuffled rounds."""
    s = self.s
    runners = {r.key: r.runner for r in self.results}
    for run in runners.values():  # compile and warm up
      run()
      run()
    names = list(runners)
    rng = random.Random(s.seed)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    task = self.task("latency", s.latency_rounds)
    for i in range(s.latency_rounds):
      rng.shuffle(names)
      for name in names:
        runners[name]()
        t = time.perf_counter()
        for _ in range(s.latency_block):
          runners[name]()
        per_call[name].append((time.perf_counter() - t) / s.latency_block)
      self.progress.update(task, completed=i + 1)
    base = per_call["float32"]
    for r in self.results:
      r.extra["latency_ms"] = 1e3 * statistics.median(per_call[r.key])
      r.extra["speedup"] = statistics.median(b / t for b, t in zip(base, per_call[r.key]))


def _check_factors(served: PyTree, params: PyTree) -> None:
  """The factors to be timed multiply out to the loaded kernels bit for bit."""
  for name, layer in served.items():
    if "kernel_u" in layer:
      product = jc.lowrank.Factors(layer["kernel_u"], layer["kernel_v"], params[name]["kernel"].shape)
      if not bool(jnp.array_equal(product.materialize(), params[name]["kernel"])):
        raise AssertionError(f"{name}: the factors do not give the kernel the file holds.")


_INFERENCE = {
    "codes": "integer codes (compressed_dense)",
    "factors": "two factors (factorized_dense)",
    "decoded": "decoded float weights",
}


# --------------------------------------------------------------------------
# Results: JSON, table, plot, report.
# --------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[bool]:
  """Which ``(bytes, accuracy)`` points no other point beats on both (fewer or equal bytes
  and higher or equal accuracy, one of them strictly).

  Example:
    >>> from jaxcompress.cli.demo import pareto
    >>> pareto([(100, 0.9), (50, 0.9), (10, 0.5), (60, 0.95)])
    [False, True, True, True]
  """
  return [
      not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2 in points)
      for b, a in points
  ]


def results_json(demo: Demo, seconds: float) -> dict:
  """The run as one JSON object."""
  float_row = demo.results[0]
  front = pareto([(r.file_bytes, r.accuracy) for r in demo.results])
  s = demo.s
  labels = {
      "float32": "float32", "magnitude": f"pruned {s.prune_sparsity:.0%}", "nm24": "2:4",
      "int8_qat": "int8 QAT", "int4_qat": "int4 QAT", "gptq": f"GPTQ int{s.gptq_bits}",
      "svd": "low-rank", "kmeans": f"k-means {2 ** s.kmeans_bits}", "distill": "student",
      "nm24_int8": "2:4 + int8", "deep_compression": "Deep Compression",
  }
  rows = []
  for r, on_front in zip(demo.results, front):
    rows.append({
        "key": r.key,
        "technique": r.technique,
        "label": labels.get(r.key, r.key),
        "accuracy": r.accuracy,
        "delta_points": 100 * (r.accuracy - float_row.accuracy),
        "file_bytes": r.file_bytes,
        "size_ratio": float_row.file_bytes / r.file_bytes,
        "latency_ms": r.extra.get("latency_ms"),
        "speedup": r.extra.get("speedup"),
        "inference": r.inference,
        "pareto": on_front,
        "train_steps": r.steps,
        "seconds": r.seconds,
        "file": r.file,
        **{k: v for k, v in r.extra.items() if k not in ("latency_ms", "speedup")},
    })
  return {
      "command": "jaxcompress demo",
      "settings": dataclasses.asdict(demo.s),
      "data": {"dataset": "sklearn.datasets.load_digits", "train": len(demo.x_train),
               "test": len(demo.x_test), "split": f"stratified 75/25, random_state={demo.s.seed}"},
      "model": f"MLP 64-{'-'.join(map(str, demo.s.features))}",
      "float_accuracy": float_row.accuracy,
      "float_file_bytes": float_row.file_bytes,
      "results": rows,
      "environment": environment(),
      "seconds": seconds,
      "plot": "demo.png",
      "report": "report.md",
  }


def environment() -> dict:
  """Versions, the device and the CPU: latency figures mean little without them."""
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {
      "jax": jax.__version__, "python": platform.python_version(), "backend": jax.default_backend(),
      "devices": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
  }


def table(data: dict) -> str:
  """The results as a Markdown table (what the demo prints and the report holds)."""
  head = ["technique", "accuracy %", "change (points)", "bytes on disk", "smaller", "faster",
          "inference", "Pareto"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  for r in data["results"]:
    cells = [
        r["technique"], f"{100 * r['accuracy']:.2f}", f"{r['delta_points']:+.2f}", str(r["file_bytes"]),
        f"{r['size_ratio']:.2f}x", "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        r["inference"], "yes" if r["pareto"] else "",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _place_labels(ax, xy: list[tuple[float, float]], labels: list[str], fontsize: float) -> None:
  """Annotates each point where its label overlaps no earlier label and no point."""
  fig = ax.figure
  fig.canvas.draw()
  to_px = ax.transData.transform
  points = [to_px(p) for p in xy]
  placed: list[tuple[float, float, float, float]] = []
  px = fontsize * fig.dpi / 72
  offsets = [(7, 3), (7, -11), (-7, 3), (-7, -11), (7, 13), (7, -21), (-7, 13), (-7, -21), (7, 23), (-7, 23)]
  for (x, y), (xd, yd), label in sorted(zip(xy, points, labels), key=lambda t: t[0][0]):
    w, h = 0.6 * px * len(label), px
    for dx, dy in offsets:
      x0 = xd + dx if dx > 0 else xd + dx - w
      box = (x0, yd + dy, x0 + w, yd + dy + h)
      clash = any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)
      clash = clash or any(box[0] - 3 < p[0] < box[2] + 3 and box[1] - 3 < p[1] < box[3] + 3 for p in points)
      if not clash:
        break
    placed.append(box)
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx * 72 / fig.dpi, dy * 72 / fig.dpi),
                ha="left" if dx > 0 else "right", va="bottom", fontsize=fontsize)


def _kilobytes(x: float, _pos: Any = None) -> str:
  return f"{x / 1000:g} kB"


def plot(data: dict, path: pathlib.Path) -> None:
  """Accuracy against bytes on disk (log scale), the Pareto front marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

  rows = data["results"]
  fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
  front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["file_bytes"])
  ax.step([r["file_bytes"] for r in front], [100 * r["accuracy"] for r in front], where="post",
          color="tab:red", lw=1.5, alpha=0.6, label="Pareto front", zorder=1)
  for on in (False, True):
    sel = [r for r in rows if r["pareto"] == on]
    ax.scatter([r["file_bytes"] for r in sel], [100 * r["accuracy"] for r in sel], s=55 if on else 40,
               zorder=2, color="tab:red" if on else "tab:blue", edgecolor="black" if on else "none",
               label="on the front" if on else "dominated")
  ax.set_xscale("log")
  lo, hi = min(r["file_bytes"] for r in rows), max(r["file_bytes"] for r in rows)
  ax.set_xlim(lo / 1.6, hi * 2.2)
  accs = [100 * r["accuracy"] for r in rows]
  pad = max(0.5, 0.08 * (max(accs) - min(accs)))
  ax.set_ylim(min(accs) - pad, max(accs) + 2 * pad)
  ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(FuncFormatter(_kilobytes))
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel("bytes on disk (the saved safetensors file; log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"jaxcompress demo: digits, {data['model']}", fontsize=10)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  _place_labels(ax, [(r["file_bytes"], 100 * r["accuracy"]) for r in rows], [r["label"] for r in rows], 7.5)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def report(data: dict) -> str:
  """The Markdown report: the table, the plot and the exact settings."""
  env = data["environment"]
  gptq = next((r for r in data["results"] if r["key"] == "gptq"), None)
  parts = [
      "# jaxcompress demo", "",
      f"{data['model']} on scikit-learn's digits ({data['data']['train']} training, "
      f"{data['data']['test']} test images, {data['data']['split']}). Float accuracy "
      f"{100 * data['float_accuracy']:.2f}%, float32 file {data['float_file_bytes']} bytes.", "",
      "Accuracy is that of the saved file loaded back; bytes are the file's size on disk "
      "(`jc.export.save`, one safetensors file); smaller = float32 file / this file; faster = "
      "float32 forward time / this forward time over the test set, timed side by side (median "
      f"over {data['settings']['latency_rounds']} rounds); Pareto: no other row is at least as "
      "small and as accurate, and better in one. One test image is "
      f"{100 / data['data']['test']:.2f} points.", "",
      table(data), "",
      "![accuracy against bytes on disk](demo.png)", "",
      "## Settings", "",
      "```json", json.dumps(data["settings"], indent=2), "```", "",
  ]
  if gptq is not None:
    parts += ["GPTQ recipe (as `jaxcompress compress` reads it):", "", "```toml",
              gptq["recipe"].rstrip(), "```", ""]
  parts += [
      "## Environment", "",
      f"jax {env['jax']} on {env['backend']} ({env['devices']} device(s)), Python {env['python']}, "
      f"CPU {env['cpu']} ({env['cpu_count']} cores). The whole run took {data['seconds']:.0f} s.", "",
  ]
  return "\n".join(parts)


# --------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------


class _Silent:
  """A progress display that shows nothing (``--quiet``)."""

  def add_task(self, *args, **kwargs) -> int:
    return 0

  def update(self, *args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _progress(quiet: bool):
  if quiet:
    yield _Silent()
    return
  from rich.console import Console
  from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                             TimeElapsedColumn, TimeRemainingColumn)

  columns = (
      TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
      TextColumn("loss {task.fields[loss]:>7}"), TimeElapsedColumn(), TextColumn("eta"),
      TimeRemainingColumn(),
  )
  with Progress(*columns, console=Console(stderr=True)) as progress:
    yield progress


def run(*, out: str | os.PathLike = "jaxcompress-demo", seed: int = 0, fast: bool = False,
        quiet: bool = False, as_json: bool = False) -> int:
  """Runs the demo; prints the table (or the JSON) and writes the files.

  Args:
    out: the output directory.
    seed: the seed of the data split, inits and batches.
    fast: the smoke-run settings (``Settings.make(fast=True)``).
    quiet: no progress bars.
    as_json: print the results as one JSON object on stdout, nothing else.

  Returns:
    0.
  """
  t0 = time.perf_counter()
  out = pathlib.Path(out)
  (out / "artifacts").mkdir(parents=True, exist_ok=True)
  settings = Settings.make(seed=seed, fast=fast)
  with _progress(quiet) as progress:
    demo = Demo(settings, out, progress)
    demo.run()
    demo.time_all()
  data = results_json(demo, time.perf_counter() - t0)
  plot(data, out / "demo.png")
  data["seconds"] = time.perf_counter() - t0
  (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
  (out / "report.md").write_text(report(data))
  if as_json:
    print(json.dumps(data))
  else:
    print(table(data))
    print(f"\nwrote {out / 'report.md'}, {out / 'demo.png'}, {out / 'results.json'} and "
          f"{len(data['results'])} artifacts in {out / 'artifacts'} ({data['seconds']:.0f} s)")
  sys.stdout.flush()
  return 0


__all__ = ["Demo", "MLP", "Settings", "pareto", "plot", "report", "results_json", "run", "table"]
