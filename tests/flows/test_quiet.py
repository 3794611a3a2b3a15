"""A Failed state the flow returned is one line in the run's logs; raised errors keep their traceback.
(Through a real worker: tests/deployments/test_production_e2e.py, refused runs.)"""

import logging
import sys

from prefect.exceptions import FailedRun

import flows.batch  # noqa: F401  (installs the filter, as a worker importing the flow does)
from flows.quiet import FLOW_RUN_LOGGER


def _logged(exc: BaseException, message: str = "Engine execution exited with unexpected exception") -> list:
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger(FLOW_RUN_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise exc
        except BaseException:
            logger.error(message, exc_info=sys.exc_info())
    finally:
        logger.removeHandler(handler)
    return seen


def test_the_engines_traceback_of_a_returned_failed_state_is_dropped():
    """Old: after "Finished in state Failed('preflight failed: …')" the engine logged a 40-line
    "Engine execution exited with unexpected exception" traceback of FailedRun."""
    assert _logged(FailedRun("preflight failed: output s3://b/o/ is not writable")) == []


def test_other_errors_keep_their_traceback():
    assert len(_logged(ValueError("a bug"))) == 1
    assert len(_logged(FailedRun("x"), message="something else")) == 1
