"""A run that ends Failed on purpose says why in one line, without Prefect's traceback.

stylize-batch returns a Failed state whose message is one line when it refuses a run (invalid
parameters, preflight) or when too many pairs failed. In a worker's flow-run process Prefect's
engine then asks that state for its result, which raises ``FailedRun`` (the state's message, no
cause), and logs it to the run's logs as "Engine execution exited with unexpected exception"
with some 40 lines of Prefect's own frames, after the run already said "Finished in state
Failed('…')". ``quiet_returned_failures`` drops exactly that record when its exception is a
``FailedRun``: a Failed state a flow returned, never an error raised in flow code, whose
tracebacks are all kept.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_returned_failures", "ReturnedFailureFilter"]

#: The logger Prefect's engine reports a flow run's outcome on (prefect.logging.loggers.flow_run_logger).
FLOW_RUN_LOGGER = "prefect.flow_runs"
_ENGINE_MESSAGE = "Engine execution exited with unexpected exception"


class ReturnedFailureFilter(logging.Filter):
    """Drops the engine's traceback of a Failed state the flow returned (the run's own one line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FailedRun) and record.getMessage() == _ENGINE_MESSAGE)


def quiet_returned_failures() -> None:
    """Install the filter on the flow-run logger, once per process."""
    logger = logging.getLogger(FLOW_RUN_LOGGER)
    if not any(isinstance(f, ReturnedFailureFilter) for f in logger.filters):
        logger.addFilter(ReturnedFailureFilter())
