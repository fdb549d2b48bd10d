"""`python -m mixtral ...`: the `mixtral` command. As an entry point it sits above every module, so it is the one
module under mixtral/ that imports `mixtral.cli`."""
from __future__ import annotations

import sys

from mixtral.cli import main

if __name__ == "__main__":
    sys.exit(main())
