"""`python -m diffusers_helper.settings`: the effective settings, where each came from, and the docs table.

The settings themselves live in `diffusers_helper.config`."""

import sys

from .config.docs import main

if __name__ == "__main__":
    sys.exit(main())
