"""The ``pdenets`` console script: a Ctrl-C while torch and Lightning are imported ends with one line, too."""

from __future__ import annotations

import sys


def main() -> None:
    """Import the CLI (seconds: torch, Lightning) and run :func:`lightning_pdenets.cli.main`."""
    try:
        from lightning_pdenets.cli.entry import main as run
    except KeyboardInterrupt:  # 130 is cli.exit_codes.EXIT_INTERRUPTED, which cannot be imported before the CLI
        sys.stderr.write("pdenets: interrupted by Ctrl-C while starting (exit code 130).\n")
        sys.exit(130)
    run()
