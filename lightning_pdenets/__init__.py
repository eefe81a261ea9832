"""lightning_pdenets: Lightning framework for image classifiers built from differential equations."""

__version__ = "0.3.0"
