"""Callback arguments that used to be accepted and fail (or mislead) only later are refused at construction."""

from __future__ import annotations

import pytest

from lightning_pdenets.callbacks import (
    AdversarialEvaluation,
    CheckpointOnInterrupt,
    EMAWeights,
    MultilevelTraining,
    NFEMonitor,
    OODEvaluation,
    ResumeAwareProgressBar,
    StepSizeAdaptation,
)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        # Lightning takes 0 and never updates: the untouched initial copy replaced the trained weights after fit
        (lambda: EMAWeights(update_every_n_steps=0), "`update_every_n_steps` must be an integer >= 1, got 0"),
        (lambda: EMAWeights(update_every_n_steps="2"), "`update_every_n_steps` must be an integer >= 1, got '2'"),
        (lambda: EMAWeights(update_starting_at_step=-1), "`update_starting_at_step` must be an integer >= 0 or None"),
        (lambda: EMAWeights(update_starting_at_epoch=1.5), "`update_starting_at_epoch` must be an integer >= 0 or"),
        (lambda: EMAWeights(use_buffers="no"), "`use_buffers` must be True or False, got 'no'"),
        # a string such as "no" is truthy: it was taken as True
        (lambda: AdversarialEvaluation(log_figure="no"), "`log_figure` must be True or False, got 'no'"),
        (lambda: AdversarialEvaluation(pgd_random_init="no"), "`pgd_random_init` must be True or False"),
        (lambda: AdversarialEvaluation(seed="x"), "`seed` must be an integer >= 0, got 'x'"),
        (lambda: OODEvaluation(seed=1.5), "`seed` must be an integer >= 0, got 1.5"),
        (lambda: NFEMonitor(log_steps="yes"), "`log_steps` must be True or False, got 'yes'"),
        (lambda: MultilevelTraining(refine_epochs=5), "`refine_epochs` must be a non-empty list of epochs >= 1"),
        (lambda: MultilevelTraining([1], refine_weights=1), "`refine_weights` must be True or False, got 1"),
        (lambda: StepSizeAdaptation(initial_step_size="Hairer"), "`initial_step_size` must be 'hairer' or a number"),
        # these failed only when a run was interrupted, replacing the interrupt and writing no checkpoint
        (lambda: CheckpointOnInterrupt(dirpath=5), "`dirpath` must be a folder path or None"),
        (lambda: CheckpointOnInterrupt(filename="last.ckpt"), "no .ckpt: it is added"),
        (lambda: CheckpointOnInterrupt(filename="a/b"), "`filename` must be a plain file stem"),
        (lambda: ResumeAwareProgressBar(refresh_rate=-1), "`refresh_rate` must be an integer >= 0, got -1"),
        (lambda: ResumeAwareProgressBar(refresh_rate="x"), "`refresh_rate` must be an integer >= 0, got 'x'"),
        (lambda: ResumeAwareProgressBar(leave="no"), "`leave` must be True or False"),
    ],
)
def test_a_bad_callback_argument_is_named_at_construction(build, message: str) -> None:
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_the_documented_values_are_still_accepted(tmp_path) -> None:
    EMAWeights(update_every_n_steps=2, update_starting_at_step=0, update_starting_at_epoch=None)
    MultilevelTraining(refine_epochs=(1, 3))
    StepSizeAdaptation(initial_step_size=0.1)
    ResumeAwareProgressBar(refresh_rate=0)  # 0 turns the bar off, as in TQDMProgressBar
    assert CheckpointOnInterrupt(dirpath=tmp_path).ckpt_path == str(tmp_path / "interrupted.ckpt")
