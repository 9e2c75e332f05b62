"""``python -m mixprec ...`` runs the ``mixprec`` command (also under ``torchrun -m mixprec``)."""

import sys

from mixprec.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
