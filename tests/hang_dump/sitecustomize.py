"""Dump every thread's stack and exit when a test subprocess outlives ``$PDENETS_TEST_DUMP_AFTER`` seconds.

tests/test_ddp_cli.py puts this folder on ``PYTHONPATH``, so every process of a launch (Lightning relaunches
the command for the other DDP ranks with the same environment) writes its stacks to stderr before the test's
own timeout: a hang fails with each rank's stack, not with a CI time-out.
"""

import faulthandler
import os

_seconds = float(os.environ.get("PDENETS_TEST_DUMP_AFTER") or 0)
if _seconds > 0:
    faulthandler.dump_traceback_later(_seconds, exit=True)
