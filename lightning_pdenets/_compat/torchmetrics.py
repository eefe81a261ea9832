"""torchmetrics: a metric whose accumulated states were restored counts as updated.

A fit resumed inside an epoch restores the sums of that epoch's metrics by setting their state attributes (read
through the public ``Metric.metric_state`` when saved). ``compute()`` would still warn that ``update`` was never
called: torchmetrics counts updates in the private ``Metric._update_count``, ``update_count`` has no setter and
``merge_state`` leaves the count alone. ``tests/test_library_adapters.py`` checks this against the installed
torchmetrics and names this function when it changes.
"""

from __future__ import annotations

from torchmetrics import Metric


def mark_updated(metric: Metric) -> None:
    """Count at least one update on ``metric``, so that ``compute()`` of restored states does not warn."""
    metric._update_count = max(metric._update_count, 1)  # private: torchmetrics has no public setter
