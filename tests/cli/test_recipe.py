"""Recipes: the jc.Rule vocabulary by name, and every error pointing at its file and line.

All in-process and without compiling anything (recipes are parsed and matched
against leaf paths only), so these run in README's fast test command.
"""

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cli import main
from jaxcompress.cli.oneshot import compress, dense_chain
from jaxcompress.cli.recipe import RecipeError, load_recipe, parse_recipe


def mlp_params():
  """Numpy leaves: matching rules against them compiles nothing."""
  sizes = (8, 16, 4)
  return {
      f"Dense_{i}": {"kernel": np.ones((a, b), np.float32), "bias": np.zeros(b, np.float32)}
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def error(text: str) -> RecipeError:
  with pytest.raises(RecipeError) as e:
    recipe = parse_recipe(text, "recipe.toml")
    recipe.owners(mlp_params())
  return e.value


GOOD = """\
huffman = true

[[rules]]
pattern = 'Dense_0/kernel'
stages = [
  { stage = "prune.magnitude", sparsity = 0.5 },
  { stage = "quant.FakeQuant", bits = 4, granularity = { type = "quant.PerGroup", size = 4 } },
]

[[rules]]
pattern = ['Dense_1/kernel']

[[rules.stages]]
stage = "prune.Prune"
structure = { type = "prune.NM", n = 2, m = 4 }

[[rules.stages]]
stage = "quant.FakeQuant"
bits = 8

[[rules]]
pattern = '.*bias'
stages = [{ stage = "cluster.kmeans", bits = 2 }]
"""


def test_a_recipe_is_the_spec_written_by_hand():
  recipe = parse_recipe(GOOD, "recipe.toml")
  by_hand = [
      jc.Rule("Dense_0/kernel", [jc.prune.magnitude(sparsity=0.5),
                                 jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=4))]),
      jc.Rule(("Dense_1/kernel",), [jc.prune.Prune(structure=jc.prune.NM(2, 4)), jc.quant.FakeQuant(bits=8)]),
      jc.Rule(".*bias", [jc.cluster.kmeans(bits=2)]),
  ]
  assert recipe.huffman is True
  assert recipe.gptq == (None, None, None)
  assert [r.pattern for r in recipe.rules] == [r.pattern for r in by_hand]
  assert [r.stages for r in recipe.rules] == [r.stages for r in by_hand]  # frozen dataclasses: equal settings
  assert recipe.owners(mlp_params()) == {
      "Dense_0/bias": 2, "Dense_0/kernel": 0, "Dense_1/bias": 2, "Dense_1/kernel": 1,
  }


def test_gptq_rule_is_a_static_fake_quant_of_its_format_and_keeps_gptq_arguments():
  recipe = parse_recipe(
      '[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.gptq", bits = 3, damp = 0.05, '
      'granularity = { type = "quant.PerGroup", size = 4, axis = 0 } }]\n'
  )
  (stage,) = recipe.rules[0].stages
  assert stage == jc.quant.FakeQuant(bits=3, granularity=jc.quant.PerGroup(size=4, axis=0), ranges="static")
  assert recipe.gptq[0] == {"bits": 3, "damp": 0.05, "granularity": jc.quant.PerGroup(size=4, axis=0)}


@pytest.mark.parametrize(
    "text, line, words",
    [
        # TOML syntax: the line tomllib reports.
        ('[[rules]]\npattern = "x"\nstages = [{ stage = "quant.FakeQuant", bits = }]\n', 3, "invalid TOML"),
        ('[[rules]\npattern = "x"\n', 1, "invalid TOML"),
        # Unknown names.
        ('[[rules]]\npattern = ".*kernel"\nstages = [\n  { stage = "quant.FakeQuant" },\n'
         '  { stage = "prune.magnitud", sparsity = 0.5 },\n]\n', 5, "Did you mean 'prune.magnitude'"),
        ('[[rules]]\npattern = ".*kernel"\n\n[[rules.stages]]\nstage = "prune.Prune"\n'
         'structure = { type = "prune.NN", n = 2, m = 4 }\n', 6, "unknown type 'prune.NN'"),
        ('huffmann = true\n[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n',
         1, "unknown key 'huffmann'"),
        ('[[rules]]\npattern = ".*kernel"\nstage = [{ stage = "quant.FakeQuant" }]\n', 3,
         "unknown key 'stage'"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ name = "quant.FakeQuant" }]\n', 3, "has no name"),
        # Arguments a stage does not take, or refuses.
        ('[[rules]]\npattern = ".*kernel"\nstages = [\n  { stage = "prune.magnitude", sparsity = 0.5 },\n'
         '  { stage = "quant.FakeQuant", bitz = 4 },\n]\n', 5, "takes no argument 'bitz'. Did you mean 'bits'"),
        ('[[rules]]\npattern = ".*kernel"\n\n[[rules.stages]]\nstage = "quant.FakeQuant"\n'
         '# int4\nbitz = 4\n', 7, "takes no argument 'bitz'"),
        ('[[rules]]\npattern = ".*kernel"\n\n[[rules.stages]]\nstage = "quant.FakeQuant"\n'
         'symmetric = true\nbits = 12\n', 7, "bits=12"),
        ('[[rules]]\npattern = ".*kernel"\n\n[[rules.stages]]\nstage = "prune.magnitude"\n\n'
         'sparsity = 1.5\n', 7, "sparsity"),
        ('[[rules]]\npattern = ".*kernel"\n\n[[rules.stages]]\nstage = "prune.Prune"\n'
         'structure = { type = "prune.NM", n = 2, mm = 4 }\n', 6, "prune.NM takes no argument 'mm'"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "lowrank.svd", rank = 2, fraction = 0.5 }]\n',
         3, "exactly one of"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.gptq", bits = 4, dampp = 0.1 }]\n',
         3, "quant.gptq takes no argument 'dampp'"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.gptq", block_size = 0 }]\n',
         3, "block_size=0"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [\n  { stage = "prune.magnitude", sparsity = 0.5 },\n'
         '  { stage = "quant.gptq" },\n]\n', 5, "only stage of its rule"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [\n  { stage = "prune.magnitude", sparsity = 0.5 },\n'
         '  { stage = "lowrank.svd", rank = 2 },\n]\n', 2, "must come first"),
        ('[[rules]]\npattern = "Dense_(0"\nstages = [{ stage = "quant.FakeQuant" }]\n', 2,
         "not a valid regular expression"),
        # Patterns that select nothing, found once the params are known.
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n\n'
         '[[rules]]\npattern = "Dense_9/kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n', 6,
         "selects no leaf"),
        ('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n\n'
         '[[rules]]\npattern = "Dense_0/kernel"\nstages = [{ stage = "quant.FakeQuant" }]\n', 6,
         "owned by the earlier rule"),
        ('[[rules]]\npattern = "Dense_0/.*"\nstages = [{ stage = "quant.gptq" }]\n', 2,
         "also selects 'Dense_0/bias'"),
        ('rules = 3\n', 1, "at least one [[rules]] table"),
    ],
)
def test_each_error_names_the_file_and_line(text, line, words):
  e = error(text)
  assert e.source == "recipe.toml" and e.line == line, str(e)
  assert str(e).startswith(f"recipe.toml:{line}: ")
  assert words in str(e)
  assert f"\n  {line:>3} | {text.splitlines()[line - 1]}" in str(e)  # the line itself is shown


def test_bad_recipe_exits_2_with_the_line_and_no_traceback(tmp_path, capsys):
  bad = tmp_path / "recipe.toml"
  bad.write_text('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.FakeQuant", bitz = 4 }]\n')
  # The recipe is read first: the checkpoint (which does not exist) is never opened.
  code = main(["compress", str(tmp_path / "ckpt"), "--recipe", str(bad), "--out", str(tmp_path / "m.safetensors")])
  err = capsys.readouterr().err
  assert code == 2
  assert f"{bad}:3: quant.FakeQuant takes no argument 'bitz'" in err
  assert "Traceback" not in err
  assert not (tmp_path / "m.safetensors").exists()


def test_missing_recipe_and_non_utf8_recipe(tmp_path, capsys):
  assert main(["compress", "ckpt", "--recipe", str(tmp_path / "none.toml"), "--out", "m.safetensors"]) == 2
  assert "none.toml" in capsys.readouterr().err
  raw = tmp_path / "latin.toml"
  raw.write_bytes(b'# caf\xe9\n[[rules]]\n')
  with pytest.raises(RecipeError, match=r"latin.toml:1: the file is not UTF-8"):
    load_recipe(raw)


def test_gptq_needs_calibration_and_an_mlp():
  gptq = parse_recipe('[[rules]]\npattern = ".*kernel"\nstages = [{ stage = "quant.gptq" }]\n')
  with pytest.raises(ValueError, match=r"needs calibration inputs: pass --calib"):
    compress(mlp_params(), gptq)
  conv = {"Conv_0": {"kernel": np.ones((3, 3, 4, 8), np.float32)}, "Dense_1": {"kernel": np.ones((8, 2), np.float32)}}
  recipe = parse_recipe('[[rules]]\npattern = "Dense_1/kernel"\nstages = [{ stage = "quant.gptq" }]\n')
  with pytest.raises(ValueError, match=r"Conv_0/kernel has shape \(3, 3, 4, 8\), not \(in, out\)"):
    compress(conv, recipe, np.ones((4, 3), np.float32))


@pytest.mark.parametrize(
    "params, words",
    [
        ({"Dense_0": {"kernel": np.ones((4, 3))}, "Dense_1": {"kernel": np.ones((2, 1))}},
         "Dense_0 gives 3 features but Dense_1/kernel takes 2"),
        ({"encoder": {"kernel": np.ones((4, 3))}}, "module 'encoder' has no position number"),
        ({"Dense_0": {"kernel": np.ones((4, 3)), "scale": np.ones(3)}}, "holds ['kernel', 'scale']"),
        ({"Dense_0": {"kernel": np.ones((4, 3)), "bias": np.ones(4)}}, "Dense_0/bias has shape (4,)"),
        ({"a_1": {"kernel": np.ones((4, 4))}, "b_1": {"kernel": np.ones((4, 4))}}, "the same position"),
    ],
)
def test_models_that_are_not_a_chain_of_dense_layers_are_refused(params, words):
  with pytest.raises(ValueError) as e:
    dense_chain(params)
  assert words in str(e.value)
  assert "jc.quant.gptq_params" in str(e.value)  # the way out


def test_a_stage_that_refuses_a_leaf_points_at_its_rule():
  recipe = parse_recipe(
      'huffman = false\n\n[[rules]]\npattern = ".*kernel"\n'
      'stages = [{ stage = "prune.Prune", structure = { type = "prune.NM", n = 2, m = 4 } }]\n', "r.toml"
  )
  with pytest.raises(RecipeError, match=r"^r.toml:4: NM\(2, 4\) at 'Dense_0/kernel': axis 0 of shape \(6, 4\)"):
    compress({"Dense_0": {"kernel": np.ones((6, 4), np.float32)}}, recipe)


def test_argument_objects_as_the_docs_write_them():
  recipe = parse_recipe(
      '[[rules]]\npattern = "Dense_0/kernel"\n'
      'stages = [{ stage = "lowrank.SVD", rank = { type = "lowrank.Fraction", fraction = 0.5 } }]\n\n'
      '[[rules]]\npattern = "Dense_1/kernel"\n'
      'stages = [{ stage = "quant.FakeQuant", bits = 4, granularity = { type = "quant.PerGroup", size = 4 } }]\n'
  )
  assert recipe.rules[0].stages == (jc.lowrank.SVD(rank=jc.lowrank.Fraction(0.5)),)
  assert recipe.rules[1].stages == (jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=4)),)
