"""The ``jaxcompress`` command end to end, in subprocesses, at ``--fast`` size.

Every figure the commands print is checked against what is on disk and
against references computed here with numpy (file sizes with ``os.path``,
accuracies with a float64 forward pass of the decoded files, the Pareto front
by brute force, pruning and quantization by their formulas, the low-rank
kernel by numpy's SVD).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc

pytestmark = pytest.mark.slow
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command as a user runs it
ENV["JAX_PLATFORMS"] = "cpu"


def start(*args, cwd=None) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "jaxcompress.cli", *map(str, args)], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd,
  )


def finish(proc: subprocess.Popen, timeout=900) -> subprocess.CompletedProcess:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def jaxcompress(*args, cwd=None, timeout=900) -> subprocess.CompletedProcess:
  return finish(start(*args, cwd=cwd), timeout)


def table_rows(text: str) -> list[list[str]]:
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]


def numpy_forward(params: dict, x: np.ndarray) -> np.ndarray:
  layers = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))
  x = x.astype(np.float64)
  for i, name in enumerate(layers):
    x = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)
    if i < len(layers) - 1:
      x = np.maximum(x, 0.0)
  return x


def digits_test_split(seed: int):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target
  return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)[1::2]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
  """Two fast runs with one seed: one printing JSON, one printing the table."""
  a, b = tmp_path_factory.mktemp("demo_json"), tmp_path_factory.mktemp("demo_table")
  procs = (
      start("demo", "--fast", "--seed", 1, "--out", a, "--json", "--quiet"),
      start("demo", "--fast", "--seed", 1, "--out", b),
  )
  run_a, run_b = (finish(p) for p in procs)  # side by side: each compiles most of its time
  return (run_a, a), (run_b, b)


def test_demo_json_is_one_object_equal_to_results_json(demo_runs):
  (run, out), _ = demo_runs
  assert run.returncode == 0, run.stderr[-3000:]
  data = json.loads(run.stdout)  # the whole of stdout is one JSON object
  on_disk = json.loads((out / "results.json").read_text())
  assert data["results"] == on_disk["results"]
  keys = [r["key"] for r in data["results"]]
  assert keys == ["float32", "magnitude", "nm24", "int8_qat", "int4_qat", "gptq", "svd", "kmeans",
                  "distill", "nm24_int8", "deep_compression"]
  assert data["settings"]["fast"] is True and data["settings"]["seed"] == 1


def test_demo_bytes_are_the_files_and_accuracy_is_the_files(demo_runs):
  (run, out), _ = demo_runs
  data = json.loads(run.stdout)
  x_test, y_test = digits_test_split(seed=1)
  float_bytes = os.path.getsize(out / "artifacts" / "float32.safetensors")
  assert data["float_file_bytes"] == float_bytes
  for r in data["results"]:
    path = out / r["file"]
    assert r["file_bytes"] == os.path.getsize(path), r["key"]
    assert r["size_ratio"] == pytest.approx(float_bytes / os.path.getsize(path), rel=1e-12)
    params = jc.export.decode(jc.export.load(path))
    accuracy = np.mean(np.argmax(numpy_forward(params, x_test), -1) == y_test)
    assert abs(accuracy - r["accuracy"]) <= 1.5 / len(y_test), r["key"]  # one near-tie may flip in float64
    assert r["delta_points"] == pytest.approx(100 * (r["accuracy"] - data["float_accuracy"]))
    assert r["latency_ms"] > 0 and r["speedup"] > 0
  # The pruned files really are sparse, the quantized ones really are integer codes.
  manifest = {r["key"]: jc.export.read_manifest(out / r["file"]) for r in data["results"]}
  kernels = lambda key: [e for e in manifest[key]["leaves"] if e["path"].endswith("kernel")]
  assert all(e["encoding"].startswith("int8 ") for e in kernels("int8_qat"))
  assert all(e["encoding"].startswith("int4 ") for e in kernels("gptq"))
  assert all(e["encoding"].startswith("svd[") for e in kernels("svd") if e["path"] != "Dense_2/kernel")
  assert all(e["chain"] == ["Cluster"] and e["encoding"].startswith("codebook32 ")
             for e in kernels("deep_compression"))
  for key in ("magnitude", "deep_compression"):  # the clustered model keeps the pruned zeros
    params = jc.export.decode(jc.export.load(out / f"artifacts/{key}.safetensors"))
    assert all(abs(np.mean(np.asarray(params[n]["kernel"]) == 0) - 0.9) < 0.01 for n in params)


def test_demo_pareto_front_by_brute_force(demo_runs):
  (run, _), _ = demo_runs
  rows = json.loads(run.stdout)["results"]
  for r in rows:
    beaten = any(
        (o["file_bytes"] <= r["file_bytes"] and o["accuracy"] >= r["accuracy"])
        and (o["file_bytes"] < r["file_bytes"] or o["accuracy"] > r["accuracy"])
        for o in rows
    )
    assert r["pareto"] is (not beaten), r["key"]
  assert any(r["pareto"] for r in rows)


def test_demo_is_deterministic_under_its_seed(demo_runs):
  (run_a, _), (run_b, out_b) = demo_runs
  assert run_b.returncode == 0, run_b.stderr[-3000:]
  a = json.loads(run_a.stdout)["results"]
  b = json.loads((out_b / "results.json").read_text())["results"]
  for ra, rb in zip(a, b):
    assert (ra["key"], ra["accuracy"], ra["file_bytes"]) == (rb["key"], rb["accuracy"], rb["file_bytes"])


def test_demo_table_figures_equal_its_json(demo_runs):
  _, (run, out) = demo_runs
  data = json.loads((out / "results.json").read_text())
  printed = table_rows(run.stdout)
  in_report = table_rows((out / "report.md").read_text())
  assert printed == in_report and len(printed) == len(data["results"])
  for cells, r in zip(printed, data["results"]):
    technique, acc, delta, nbytes, smaller, faster, inference, front = cells
    assert technique == r["technique"]
    assert acc == f"{100 * r['accuracy']:.2f}"
    assert delta == f"{r['delta_points']:+.2f}"
    assert int(nbytes) == r["file_bytes"]
    assert smaller == f"{r['size_ratio']:.2f}x"
    assert faster == f"{r['speedup']:.2f}x"
    assert inference == r["inference"]
    assert (front == "yes") is r["pareto"]
  assert "loss" in run.stderr  # the progress bars went to stderr


def test_demo_plot_and_report(demo_runs):
  import matplotlib.image

  _, (_, out) = demo_runs
  image = matplotlib.image.imread(out / "demo.png")
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
  assert image[..., :3].std() > 0.05  # not a blank canvas
  report = (out / "report.md").read_text()
  assert "![accuracy against bytes on disk](demo.png)" in report
  settings = json.loads(report.split("```json\n", 1)[1].split("```", 1)[0])
  assert settings == json.loads((out / "results.json").read_text())["settings"]
  assert 'stage = "quant.gptq"' in report  # the GPTQ recipe, as compress reads it


def test_inspect_an_artifact(demo_runs):
  (run, out), _ = demo_runs
  data = {r["key"]: r for r in json.loads(run.stdout)["results"]}
  for key in ("magnitude", "int4_qat", "svd", "deep_compression"):
    path = out / data[key]["file"]
    res = jaxcompress("inspect", path, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    assert got["kind"] == "artifact" and got["file_bytes"] == os.path.getsize(path)
    entries = {e["path"]: e for e in jc.export.read_manifest(path)["leaves"]}
    decoded = jc.export.decode(jc.export.load(path))
    for leaf in got["leaves"]:
      e = entries[leaf["path"]]
      layer, name = leaf["path"].split("/")
      value = np.asarray(decoded[layer][name])
      assert leaf["nbytes"] == e["bytes"] and leaf["chain"] == e["chain"] and leaf["shape"] == e["shape"]
      assert leaf["sparsity"] == pytest.approx(np.mean(value == 0))
      if key == "int4_qat" and name == "kernel":
        assert leaf["bits"] == "4"
      if key == "svd" and leaf["path"] in data["svd"]["ranks"]:
        assert leaf["rank"] == str(data["svd"]["ranks"][layer])
        assert np.linalg.matrix_rank(value.astype(np.float64)) <= int(leaf["rank"])
    if key == "magnitude":
      kernels = [leaf for leaf in got["leaves"] if leaf["path"].endswith("kernel")]
      assert all(abs(leaf["sparsity"] - 0.9) < 0.01 for leaf in kernels)
  table = jaxcompress("inspect", out / data["int4_qat"]["file"])
  assert table.returncode == 0 and "FakeQuant" in table.stdout
  assert f"{os.path.getsize(out / data['int4_qat']['file'])} bytes on disk" in table.stdout


# --------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------

RECIPE = """\
huffman = true

[[rules]]
pattern = 'Dense_0/kernel'
stages = [
  { stage = "prune.magnitude", sparsity = 0.5 },
  { stage = "quant.FakeQuant", bits = 8 },
]

[[rules]]
pattern = 'Dense_1/kernel'
stages = [{ stage = "quant.gptq", bits = 4, granularity = { type = "quant.PerGroup", size = 16, axis = 0 } }]

[[rules]]
pattern = 'Dense_2/kernel'
stages = [{ stage = "lowrank.svd", rank = 4 }]
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  import orbax.checkpoint as ocp

  d = tmp_path_factory.mktemp("compress")
  rng = np.random.default_rng(0)
  sizes = (32, 64, 48, 10)
  params = {
      f"Dense_{i}": {"kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                     "bias": rng.normal(scale=0.1, size=b).astype(np.float32)}
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }
  ckpt = ocp.StandardCheckpointer()
  ckpt.save((d / "ckpt").absolute(), params)
  ckpt.wait_until_finished()
  mix = rng.normal(size=(32, 32)) / 4 + np.eye(32)  # correlated inputs
  np.save(d / "calib.npy", (rng.normal(size=(256, 32)) @ mix).astype(np.float32))
  (d / "recipe.toml").write_text(RECIPE)
  return d, params


def test_compress_with_a_recipe(checkpoint):
  d, params = checkpoint
  res = jaxcompress("compress", d / "ckpt", "--recipe", d / "recipe.toml", "--calib", d / "calib.npy",
                    "--out", d / "model.safetensors", "--json")
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout)
  assert summary["file_bytes"] == os.path.getsize(d / "model.safetensors")
  report = (d / "model.report.md").read_text()
  assert RECIPE.strip() in report and "Dense_1/kernel" in report
  got = jc.export.decode(jc.export.load(d / "model.safetensors"))
  calib = np.load(d / "calib.npy")

  # Dense_0: half the weights, the largest by magnitude, on a per-channel int8 grid.
  w0, k0 = params["Dense_0"]["kernel"], np.asarray(got["Dense_0"]["kernel"])
  kept = np.abs(w0) >= np.median(np.abs(w0))
  assert np.array_equal(k0 != 0, kept)
  pruned = np.where(kept, w0, 0.0).astype(np.float64)
  scale = np.abs(pruned).max(axis=0) / 127
  np.testing.assert_allclose(k0, np.round(pruned / scale) * scale, rtol=1e-6, atol=1e-7)

  # Dense_1: GPTQ's codes, from the inputs the compressed Dense_0 gives (sequential).
  x1 = jax.nn.relu(jnp.asarray(calib) @ got["Dense_0"]["kernel"] + got["Dense_0"]["bias"])
  g = jc.quant.PerGroup(size=16, axis=0)
  q = jc.quant.gptq(jnp.asarray(params["Dense_1"]["kernel"]), x1, bits=4, granularity=g)
  # (The command ran in another process, compiled with other XLA flags: scales may differ in
  # their last bit, the integer codes do not.)
  k1 = np.asarray(got["Dense_1"]["kernel"], np.float64)
  scale = np.repeat(np.asarray(q.scale, np.float64), 16, axis=0)
  np.testing.assert_array_equal(np.round(k1 / scale), np.asarray(q.values, np.float64))
  np.testing.assert_allclose(k1, np.asarray(jc.quant.dequantize(q)), rtol=1e-5, atol=1e-7)
  # ... which beats round to nearest on the layer's output (the point of GPTQ), numpy reference:
  w1, xx = params["Dense_1"]["kernel"].astype(np.float64), np.asarray(x1, np.float64)
  groups = w1.reshape(4, 16, -1)
  s = np.abs(groups).max(axis=1, keepdims=True) / 7
  rtn = (np.clip(np.round(groups / s), -8, 7) * s).reshape(w1.shape)
  err = lambda k: np.linalg.norm(xx @ (np.asarray(k, np.float64) - w1))
  assert err(got["Dense_1"]["kernel"]) < 0.9 * err(rtn)

  # Dense_2: the best rank-4 approximation.
  u, sv, vt = np.linalg.svd(params["Dense_2"]["kernel"].astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(got["Dense_2"]["kernel"], (u[:, :4] * sv[:4]) @ vt[:4], atol=1e-5)
  for name in params:
    np.testing.assert_array_equal(got[name]["bias"], params[name]["bias"])
  assert {e["path"]: e["chain"] for e in summary["leaves"]}["Dense_1/kernel"] == ["FakeQuant"]


def test_compress_to_orbax_and_inspect_a_checkpoint(checkpoint):
  d, params = checkpoint
  (d / "prune.toml").write_text(
      '[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "prune.magnitude", sparsity = 0.75 }]\n'
  )
  res = jaxcompress("compress", d / "ckpt", "--recipe", d / "prune.toml", "--out", d / "pruned")
  assert res.returncode == 0, res.stderr[-3000:]
  assert (d / "pruned.report.md").exists() and (d / "pruned").is_dir()
  got = jc.export.decode(jc.export.load(d / "pruned"))
  for name in params:
    kernel = np.asarray(got[name]["kernel"])
    assert np.mean(kernel == 0) == pytest.approx(0.75, abs=1 / kernel.size)
  res = jaxcompress("inspect", d / "pruned", "--json")  # an artifact as an Orbax directory
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout)
  assert summary["kind"] == "artifact"
  assert summary["file_bytes"] == sum(f.stat().st_size for f in (d / "pruned").rglob("*") if f.is_file())
  for leaf in summary["leaves"]:
    layer, name = leaf["path"].split("/")
    assert leaf["sparsity"] == pytest.approx(np.mean(np.asarray(got[layer][name]) == 0))
  res = jaxcompress("inspect", d / "ckpt", "--json")
  assert res.returncode == 0, res.stderr[-3000:]
  plain = json.loads(res.stdout)
  assert plain["kind"] == "checkpoint"
  assert plain["dense_bytes"] == sum(a.nbytes for layer in params.values() for a in layer.values())
  assert {e["path"]: tuple(e["shape"]) for e in plain["leaves"]} == {
      f"{n}/{k}": a.shape for n, layer in params.items() for k, a in layer.items()
  }


def test_exit_codes(checkpoint, tmp_path):
  d, _ = checkpoint
  bad = tmp_path / "bad.toml"
  bad.write_text('[[rules]]\npattern = "Dense_9/kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n')
  res = jaxcompress("compress", d / "ckpt", "--recipe", bad, "--out", tmp_path / "m.safetensors")
  assert res.returncode == 2 and f"{bad}:2: pattern 'Dense_9/kernel' selects no leaf" in res.stderr
  assert "Traceback" not in res.stderr
  res = jaxcompress("compress", d / "ckpt", "--recipe", d / "recipe.toml", "--out", tmp_path / "m.safetensors")
  assert res.returncode == 2 and "pass --calib" in res.stderr and "Traceback" not in res.stderr
  res = jaxcompress("inspect", tmp_path / "nothing")
  assert res.returncode == 2 and "does not exist" in res.stderr
  res = jaxcompress("demo", "--fast", "--seed", "x")
  assert res.returncode == 2 and "invalid int value" in res.stderr
  res = jaxcompress()
  assert res.returncode == 0 and "demo" in res.stdout and "compress" in res.stdout


def test_wanda_gets_the_input_norms_of_the_calibration_data():
  """With calibration inputs, a Wanda criterion ranks |w| * ||x_j|| (numpy reference)."""
  from jaxcompress.cli.oneshot import compress
  from jaxcompress.cli.recipe import parse_recipe

  rng = np.random.default_rng(1)
  params = {
      "Dense_0": {"kernel": rng.normal(size=(8, 16)).astype(np.float32), "bias": np.zeros(16, np.float32)},
      "Dense_1": {"kernel": rng.normal(size=(16, 4)).astype(np.float32)},
  }
  calib = (rng.normal(size=(64, 8)) * rng.uniform(0.1, 5.0, size=8)).astype(np.float32)
  recipe = parse_recipe(
      '[[rules]]\npattern = ".*kernel"\n'
      'stages = [{ stage = "prune.Prune", sparsity = 0.5, criterion = { type = "prune.Wanda" } }]\n'
  )
  spec, t, s = compress(params, recipe, calib)
  got = spec.apply(t, s)
  x = calib.astype(np.float64)
  for name in ("Dense_0", "Dense_1"):
    w = params[name]["kernel"].astype(np.float64)
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    keep = score >= np.sort(score.ravel())[score.size // 2]
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]) != 0, keep)
    x = np.maximum(x @ w + params[name].get("bias", 0.0), 0.0)  # the float model's next inputs
