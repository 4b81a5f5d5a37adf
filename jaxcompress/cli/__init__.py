"""The ``jaxcompress`` command line (``pip install "jaxcompress[cli]"``)."""

from jaxcompress.cli.main import main

__all__ = ["main"]
