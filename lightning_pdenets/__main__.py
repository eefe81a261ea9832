"""``python -m lightning_pdenets`` runs the same LightningCLI as the ``pdenets`` console script."""

from lightning_pdenets.cli import main

if __name__ == "__main__":
    main()
