"""The ``pdenets`` command: Lightning's CLI over every model and datamodule of the package.

``pdenets fit --config configs/quickstart.yaml`` trains, then (unless ``--test_after_fit false``)
tests the best checkpoint, so one command reports test accuracy. Each config logs into a folder of
its own, ``logs/<config path under configs/>/version_N`` (``logs/quickstart/version_0``; a config outside
``configs/`` adds a hash of its path to its stem); ``--trainer.default_root_dir DIR`` puts it under ``DIR`` instead.

One module per job: :mod:`.app` (the LightningCLI subclass and its hooks), :mod:`.entry` (``main``: errors to
exit codes), :mod:`.exit_codes` (the statuses, the user's errors, the advice after a stop), :mod:`.arguments`
(short messages for bad arguments), :mod:`.log_folders` (naming, checking, continuing and cleaning log folders),
:mod:`.resume` (resolving and checking ``--ckpt_path``), :mod:`.overrides` (settings of this run that win over a
checkpoint's), :mod:`.data_facts` (datamodule facts linked to the model), and :mod:`._library_adapters`, the one
place that depends on jsonargparse's and Lightning's undocumented behaviour.
"""

from lightning_pdenets.cli.app import PDENetsCLI, build_cli
from lightning_pdenets.cli.entry import main
from lightning_pdenets.cli.exit_codes import EXIT_INTERRUPTED, EXIT_MODEL_FAILURE, EXIT_USAGE, USER_ERRORS
from lightning_pdenets.cli.log_folders import DEFAULT_EXPERIMENT_NAME, DEFAULT_LOG_DIR, experiment_name

__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "DEFAULT_LOG_DIR",
    "EXIT_INTERRUPTED",
    "EXIT_MODEL_FAILURE",
    "EXIT_USAGE",
    "USER_ERRORS",
    "PDENetsCLI",
    "build_cli",
    "experiment_name",
    "main",
]
