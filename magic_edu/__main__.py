"""``python -m magic_edu COMMAND ...``: the ``magic-edu`` command line (and what torchrun runs:
``torchrun --nproc_per_node 4 -m magic_edu adapt-lm ...``)."""

import sys

from .tools.cli import main

sys.exit(main())
