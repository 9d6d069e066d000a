"""`python -m saebench ...`: the saebench command, as launchers that take a module want it (torchrun -m,
accelerate launch -m)."""

import os
import sys

from saebench.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
