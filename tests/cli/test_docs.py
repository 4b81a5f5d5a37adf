"""docs/cli.md: its recipes parse, its error message is the real one, and its Python
snippets run and write what the commands write.

The snippets run in subprocesses with the environment the commands get (no test
XLA flags), so that the files they write can be compared byte for byte.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cli.recipe import RecipeError, parse_recipe, stage_names

DOC = pathlib.Path(__file__).parents[2] / "docs" / "cli.md"
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["JAX_PLATFORMS"] = "cpu"


def blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_recipes_of_the_page_parse_and_its_stage_names_exist():
  recipes = blocks("toml")
  assert len(recipes) == 2
  gptq = parse_recipe(recipes[0], "recipe.toml")
  assert gptq.huffman and [g is not None for g in gptq.gptq] == [False, True, False]
  assert parse_recipe(recipes[1]).rules[0].stages == (
      jc.prune.Prune(structure=jc.prune.NM(2, 4)), jc.quant.FakeQuant(bits=4))
  table = DOC.read_text().split("| stage | what |", 1)[1].split("\n\n", 1)[0]
  named = re.findall(r"^\| `([\w.]+)` \|", table, re.M)
  assert len(named) >= 6 and set(named) <= set(stage_names()) | {"quant.gptq"}


def test_the_error_shown_is_the_real_message():
  recipe = blocks("toml")[0].replace("bits = 8 },", "bitz = 8 },", 1)
  with pytest.raises(RecipeError) as e:
    parse_recipe(recipe, "recipe.toml")
  text = DOC.read_text()
  shown = text.split("jaxcompress compress: error: ", 1)[1].split("\n\nThe same", 1)[0]
  shown = "\n".join(line[4:] if line.startswith("    ") else line for line in shown.splitlines())
  head, rest = shown.split("Its arguments are: ", 1)  # the page shortens the list of arguments
  real_head, real_rest = str(e.value).split("Its arguments are: ", 1)
  assert head == real_head and real_rest.startswith(rest.split("...")[0])
  assert real_rest.splitlines()[1:] == rest.splitlines()[1:]


def run_python(code: str, cwd: pathlib.Path) -> str:
  res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


def run_cli(*args, cwd: pathlib.Path) -> str:
  res = subprocess.run([sys.executable, "-m", "jaxcompress.cli", *map(str, args)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """What ``jaxcompress demo`` leaves for compress, smaller: an MLP checkpoint and calibration inputs."""
  import orbax.checkpoint as ocp

  d = tmp_path_factory.mktemp("docs")
  rng = np.random.default_rng(0)
  sizes = (64, 256, 128, 10)
  params = {
      f"Dense_{i}": {"kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                     "bias": rng.normal(scale=0.1, size=b).astype(np.float32)}
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }
  ckpt = ocp.StandardCheckpointer()
  ckpt.save((d / "jaxcompress-demo" / "checkpoint").absolute(), params)
  ckpt.wait_until_finished()
  np.save(d / "jaxcompress-demo" / "calib.npy", rng.uniform(size=(256, 64)).astype(np.float32))
  (d / "recipe.toml").write_text(blocks("toml")[0])
  return d


@pytest.mark.slow
def test_compress_in_python_writes_the_commands_artifact(demo_dir):
  run_cli("compress", "jaxcompress-demo/checkpoint", "--recipe", "recipe.toml", "--calib",
          "jaxcompress-demo/calib.npy", "--out", "command.safetensors", cwd=demo_dir)
  compress_block = blocks("python")[2]
  assert "jc.quant.gptq(" in compress_block
  run_python(compress_block, demo_dir)
  ours, theirs = (jc.export.load(demo_dir / f) for f in ("model.safetensors", "command.safetensors"))
  assert ours.manifest == theirs.manifest  # encodings, sizes and CRC-32s of every leaf
  for a, b in zip(ours.leaves, theirs.leaves):
    np.testing.assert_array_equal(a.blob(), b.blob())
  # Same size on disk (safetensors may order the header's metadata keys differently).
  assert os.path.getsize(demo_dir / "model.safetensors") == os.path.getsize(demo_dir / "command.safetensors")


@pytest.mark.slow
def test_inspect_in_python_prints_what_the_command_reports(demo_dir):
  if not (demo_dir / "model.safetensors").exists():
    run_python(blocks("python")[2], demo_dir)
  printed = run_python(blocks("python")[1], demo_dir).splitlines()
  summary = json.loads(run_cli("inspect", "model.safetensors", "--json", cwd=demo_dir))
  assert len(printed) == len(summary["leaves"])
  for line, leaf in zip(printed, summary["leaves"]):
    words = line.split()
    assert words[0] == leaf["path"] and words[-2] == str(leaf["nbytes"])
    assert words[-1] == f"{leaf['sparsity']:.1%}"


@pytest.mark.slow
def test_one_row_of_the_demo_in_python(tmp_path):
  prelude = """
import numpy as np, optax, jax
from jaxcompress.cli.demo import MLP
model = MLP((32, 10))
rng = np.random.default_rng(0)
x_test = rng.uniform(size=(16, 64)).astype(np.float32)
params = model.init(jax.random.key(0), x_test[:1])["params"]
batches = [(rng.uniform(size=(8, 64)).astype(np.float32), rng.integers(0, 10, 8)) for _ in range(3)]
def loss_fn(p, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch[0]), batch[1]).mean()
"""
  check = """
import os
assert saved.nbytes == os.path.getsize("int8_qat.safetensors")
codes = [v for k, v in jax.tree_util.tree_leaves_with_path(served) if "codes" in jax.tree_util.keystr(k)]
assert len(codes) == 2 and all(c.dtype == np.int8 for c in codes)  # both kernels as int8 codes
np.testing.assert_allclose(forward(served, x_test), logits, rtol=1e-3, atol=1e-4)
print("ok")
"""
  out = run_python(prelude + blocks("python")[0] + check, tmp_path)
  assert out.strip().endswith("ok")
