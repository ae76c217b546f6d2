"""``python -m ahn`` (and ``torchrun -m ahn``): the same CLI as the ``ahn`` console script."""

from ahn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
