"""``python -m deeplab_lit`` runs the ``deeplab-lit`` command (see :mod:`deeplab_lit.command`)."""

import sys

from deeplab_lit.command import main

if __name__ == "__main__":
    sys.exit(main())
