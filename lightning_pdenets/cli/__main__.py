"""``python -m lightning_pdenets.cli``, the same command as ``pdenets``."""

import sys

from lightning_pdenets.cli.entry import main

if __name__ == "__main__":
    main(sys.argv[1:])
