"""``python -m jaxcompress.cli``: the ``jaxcompress`` command."""

import sys

from jaxcompress.cli.main import main

sys.exit(main())
