"""LightningDataModules for every dataset the papers use.

Every public submodule is imported here and the names in its ``__all__`` are re-exported.
"""

from lightning_pdenets._discovery import export_submodules

globals().update(_exports := export_submodules(__name__, __path__))
__all__ = sorted(_exports)
