"""``python -m deeplab_lit`` runs the command line (see :mod:`deeplab_lit.cli`)."""

from deeplab_lit.cli import main

if __name__ == "__main__":
    main()
