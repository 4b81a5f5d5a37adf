"""Entry point of the ``jaxcompress`` command: ``demo``, ``inspect`` and ``compress``.

Each command is a thin layer over the public API (docs/cli.md shows the
Python it runs). Errors in what the user gave (a recipe, a checkpoint, a file)
print one message, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

_EPILOG = "Docs: docs/cli.md. Every command is a few lines of the jaxcompress Python API."


class CLIError(Exception):
  """A refusal with a message for the user (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxcompress", description="Model compression for JAX, from the command line.", epilog=_EPILOG
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  demo = sub.add_parser(
      "demo", help="train an MLP on scikit-learn's digits and compress it every way; table, plot, report",
      description="Trains a float MLP on scikit-learn's digits, compresses it with each technique "
      "(pruning, N:M, QAT, GPTQ, low-rank, clustering, distillation, Deep Compression), exports "
      "each to a file and compares accuracy, bytes on disk and inference latency.",
  )
  demo.add_argument("--out", default="jaxcompress-demo", metavar="DIR",
                    help="where the artifacts, results.json, demo.png and report.md go (default: %(default)s)")
  demo.add_argument("--seed", type=int, default=0, help="seed of the data split, inits and batches (default: 0)")
  demo.add_argument("--fast", action="store_true", help="a smoke run: a few training steps per stage")
  demo.add_argument("--quiet", action="store_true", help="no progress bars")
  demo.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")

  inspect = sub.add_parser(
      "inspect", help="per-leaf table of an artifact or a params checkpoint",
      description="Per-leaf table (path, shape, dtype, technique chain, bits, sparsity, rank, bytes) "
      "of an artifact written by jc.export.save (.safetensors file or Orbax directory) or of an "
      "Orbax checkpoint of params.",
  )
  inspect.add_argument("path", metavar="PATH")
  inspect.add_argument("--json", action="store_true", help="print the table as JSON")

  compress = sub.add_parser(
      "compress", help="one-shot compression of a params checkpoint by a recipe",
      description="Compresses an Orbax checkpoint of params by a TOML recipe of jc.Rule's (pruning, "
      "quantization, GPTQ, low-rank, clustering) and writes the artifact and a report.",
  )
  compress.add_argument("checkpoint", metavar="CHECKPOINT", help="an Orbax checkpoint of a params pytree")
  compress.add_argument("--recipe", required=True, metavar="RECIPE.toml", help="the rules and stages")
  compress.add_argument("--calib", metavar="DATA.npy",
                        help="calibration inputs (n, in) for quant.gptq (MLP checkpoints)")
  compress.add_argument("--out", required=True, metavar="ARTIFACT",
                        help="the artifact: NAME.safetensors (one file) or a directory (Orbax)")
  compress.add_argument("--json", action="store_true", help="print the summary as JSON")
  return parser


def _inspect(args) -> int:
  from jaxcompress.cli import leaves

  summary = leaves.summarize(args.path)
  print(json.dumps(summary.as_json()) if args.json else summary.table())
  return 0


def _compress(args) -> int:
  import numpy as np

  import jaxcompress as jc
  from jaxcompress.cli import leaves, oneshot, recipe as recipes

  t0 = time.perf_counter()
  recipe = recipes.load_recipe(args.recipe)
  params = leaves.read_params(args.checkpoint)
  calib = None
  if args.calib is not None:
    try:
      calib = np.load(args.calib, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise CLIError(f"--calib {args.calib}: cannot read it as a .npy array ({e}).") from None
  spec, trainable, state = oneshot.compress(params, recipe, calib)
  artifact = jc.export.export(spec, trainable, state, huffman=recipe.huffman)
  out = pathlib.Path(args.out)
  fmt = "safetensors" if out.suffix == ".safetensors" else "orbax"
  saved = jc.export.save(artifact, out, format=fmt)
  summary = leaves.summarize(out)
  agreement = None
  if calib is not None:
    agreement = oneshot.output_agreement(params, jc.export.decode(jc.export.load(out, like=params)), calib)
  report = out.with_suffix(".report.md") if fmt == "safetensors" else out.parent / (out.name + ".report.md")
  report.write_text(_compress_report(args, recipe, summary, saved, agreement, time.perf_counter() - t0))
  result = {
      "artifact": str(out), "report": str(report), "format": fmt, "file_bytes": saved.nbytes,
      "dense_bytes": artifact.float_nbytes, "ratio": artifact.float_nbytes / saved.nbytes,
      "calibration": agreement, "leaves": summary.as_json()["leaves"],
  }
  if args.json:
    print(json.dumps(result))
  else:
    print(summary.table())
    if agreement is not None:
      print(f"on the calibration inputs: output relative error {agreement['relative_error']:.4f}, "
            f"top-1 agreement {agreement['top1_agreement']:.2%}")
    print(f"report: {report}")
  return 0


def _compress_report(args, recipe, summary, saved, agreement, seconds: float) -> str:
  lines = [
      f"# jaxcompress compress: {pathlib.Path(args.out).name}", "",
      f"- checkpoint: `{args.checkpoint}`",
      f"- recipe: `{args.recipe}`",
      f"- calibration inputs: `{args.calib}`" if args.calib else "- calibration inputs: none",
      f"- artifact: `{args.out}`, {saved.nbytes} bytes on disk ({saved.data_nbytes} of leaf data), "
      f"{summary.dense_nbytes} bytes dense: {summary.dense_nbytes / saved.nbytes:.2f}x smaller",
      f"- time: {seconds:.1f} s", "",
  ]
  if agreement is not None:
    lines += [
        "On the calibration inputs, against the float model: output relative error "
        f"{agreement['relative_error']:.4f}, top-1 agreement {agreement['top1_agreement']:.2%}.", "",
    ]
  lines += ["## Leaves", "", "```", summary.table(), "```", "", "## Recipe", "", "```toml",
            recipe.text.rstrip(), "```", ""]
  return "\n".join(lines)


def _demo(args) -> int:
  from jaxcompress.cli import demo

  return demo.run(out=args.out, seed=args.seed, fast=args.fast, quiet=args.quiet, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
  """Runs the ``jaxcompress`` command.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    The exit status: 0, or 2 for an error in what was given (a message on
    stderr, no traceback).

  Example:
    >>> from jaxcompress.cli import main
    >>> main(["compress"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 2
  """
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  commands = {"demo": _demo, "inspect": _inspect, "compress": _compress}
  try:
    return commands[args.command](args)
  except (CLIError, ValueError, TypeError, OSError) as e:  # RecipeError is a ValueError
    print(f"jaxcompress {args.command}: error: {e}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
