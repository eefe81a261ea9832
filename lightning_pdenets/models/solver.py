"""What every LightningModule with ODE blocks adds: one ``solver`` hyperparameter, and evaluation with another solver.

A model takes its solver as one primitive dict (``solver: {method: rk4, step_size: 0.25}``) over its own
defaults, builds a :class:`~lightning_pdenets.solvers.SolverConfig` from it and hands that to its
architecture. When a trained checkpoint is evaluated (``test``, ``validate``, ``predict``), the settings in which
the evaluation's ``solver`` differs from the training run's are applied after the weights are loaded, so
testing a trained model with another solver, the central experiment of Ott et al.'s "ResNet After All", is a
command-line change; settings the evaluation does not change keep what the checkpoint holds (a step size
adapted during training included). When ``fit`` resumes, the checkpoint's (possibly adapted) settings continue.
Both cases are logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_pdenets.protocols import find_ode_blocks
from lightning_pdenets.solvers import ADAPTIVE_SOLVERS, SolverConfig, SolverOptions

if TYPE_CHECKING:  # the mixin is only ever combined with a ClassifierModule; the checker sees it as one
    from lightning_pdenets.models.base import ClassifierModule as _MixedInto
else:
    _MixedInto = object

__all__ = ["ODESolverMixin"]


class ODESolverMixin(_MixedInto):
    """Mixin for a :class:`~lightning_pdenets.models.ClassifierModule` whose ``solver`` configures its ODE blocks.

    Subclasses set :attr:`solver_defaults`; the ``solver`` hyperparameter overrides them field by field, and the
    complete resolved configuration is stored in ``hparams.solver`` (so checkpoints say exactly how the model was
    solved). The architecture receives it as its ``solver`` argument.

    Args:
        solver: ODE solver settings over :attr:`solver_defaults` (fields of
            :class:`lightning_pdenets.solvers.SolverConfig`), e.g. ``{rtol: 1e-4, adjoint_options: {norm: seminorm}}``.
        **kwargs: The settings of the model class that follows in the method resolution order.
    """

    solver_defaults: ClassVar[dict[str, Any]] = {}
    _trained_solver: dict[str, Any] | None = None

    def __init__(self, solver: SolverOptions | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # ClassifierModule saves `solver` and builds

    def network_arguments(self) -> dict[str, Any]:
        return {**super().network_arguments(), "solver": self.resolve_solver()}

    def resolve_solver(self) -> SolverConfig:
        """The :class:`SolverConfig` of ``hparams.solver`` over :attr:`solver_defaults`; stores the full dict back."""
        config = SolverConfig.from_options(self.hparams.get("solver"), defaults=self.solver_defaults)
        self.hparams["solver"] = config.as_options()
        return config

    @override
    def _solver_remedy(self) -> str:
        settings = self.hparams["solver"]
        if settings["method"] in ADAPTIVE_SOLVERS:
            return f"tighter --model.init_args.solver.rtol/atol (now {settings['rtol']:g}/{settings['atol']:g})"
        step = settings.get("step_size")
        return "a smaller --model.init_args.solver.step_size" + (f" (now {step:g})" if step is not None else "")

    def solver_failure_context(self) -> list[dict[str, Any]]:
        return [block.solver_settings() for block in find_ode_blocks(self)]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._trained_solver = checkpoint.get("hyper_parameters", {}).get("solver")

    def _solver_changes(self) -> dict[str, Any]:
        """Settings in which this model's ``solver`` differs from the checkpoint's training configuration."""
        if self._trained_solver is None:
            return {}
        trained = SolverConfig.from_options(self._trained_solver).as_options()
        return {k: v for k, v in self.hparams["solver"].items() if trained.get(k) != v}

    def _describe_blocks(self) -> str:
        blocks = find_ode_blocks(self)
        texts = sorted(
            {
                (
                    b.solver
                    if isinstance(getattr(b, "solver", None), SolverConfig)
                    else SolverConfig.from_options(b.solver_settings())
                ).describe()
                for b in blocks
            }
        )
        return "; ".join(texts) or "no ODE block"

    def _evaluate_with_configured_solver(self) -> None:
        if self._trained_solver is None:
            return
        trained = self._describe_blocks()
        changes = self._solver_changes()
        for block in find_ode_blocks(self):
            block.configure_solver(**changes)
        self._trained_solver = None  # applied once per restore
        if changes:
            rank_zero_info(
                f"Solver: trained with {trained}; evaluated with {self._describe_blocks()} "
                f"(changed: {sorted(changes)})."
            )
        else:
            rank_zero_info(f"Solver: evaluated with the checkpoint's {trained}.")

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        self._evaluate_with_configured_solver()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self.trainer.training and not self.trainer.sanity_checking:
            self._evaluate_with_configured_solver()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._evaluate_with_configured_solver()

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()  # the learning rates of a resumed run (ClassifierModule)
        if self._trained_solver is None:
            return
        changes = self._solver_changes()
        self._trained_solver = None
        ignored = f"; the config's different {sorted(changes)} are not applied to a resumed run" if changes else ""
        rank_zero_info(
            f"Solver: resuming with the checkpoint's {self._describe_blocks()} (adapted settings included){ignored}."
        )
