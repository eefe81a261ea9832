"""Plain ``nn.Module`` networks (no Lightning imports); each registers itself in :data:`ARCHITECTURES`.

A module is named by the concept it implements, and the LightningModules wrapping its networks live in
the module of the same name in :mod:`lightning_pdenets.models` (``architectures/odenet.py`` and
``models/odenet.py``; likewise ``neural_ode``, ``pde_cnn``, ``prnet``, ``lm_resnet``, ``mobilenet``).

Every public submodule is imported here and the names in its ``__all__`` are re-exported.
"""

from lightning_pdenets._discovery import export_submodules

globals().update(_exports := export_submodules(__name__, __path__))
__all__ = sorted(_exports)
