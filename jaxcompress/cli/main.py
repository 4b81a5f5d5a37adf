"""Entry point of the ``jaxcompress`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxcompress", description="Model compression for JAX.")
  parser.parse_args(argv)
  parser.print_help()
  return 0


if __name__ == "__main__":
  sys.exit(main())
