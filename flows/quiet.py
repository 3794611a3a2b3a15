"""A run that ends Failed on purpose says why in one line, without Prefect's traceback.

stylize-batch returns a Failed state whose message is one line when it refuses a run (invalid
parameters, preflight) or when too many pairs failed. In a worker's flow-run process Prefect's
engine then asks that state for its result, which raises ``FailedRun`` (the state's message, no
cause), and logs it to the run's logs as "Engine execution exited with unexpected exception"
with some 40 lines of Prefect's own frames, after the run already said "Finished in state
Failed('…')". ``quiet_returned_failures`` drops exactly that record when its exception is a
``FailedRun``: a Failed state a flow returned, never an error raised in flow code, whose
tracebacks are all kept. Likewise a pair task that returns Failed (its one line naming the
input): the task engine's record of it, with an empty traceback, is dropped.

Both loggers also hide a URL's ``user:password@`` in every line and traceback (``CredentialsFilter``):
the Prefect client's errors quote the request's URL, PREFECT_API_URL's credentials with it.
"""

from __future__ import annotations

import logging

from nst_core.errors import hide_userinfo

__all__ = ["quiet_returned_failures", "ReturnedFailureFilter", "ReturnedFailedStateFilter", "CredentialsFilter"]

#: The logger Prefect's engine reports a flow run's outcome on (prefect.logging.loggers.flow_run_logger).
FLOW_RUN_LOGGER = "prefect.flow_runs"
#: The logger Prefect's task engine reports a task run's outcome on (prefect.logging.loggers.task_run_logger).
TASK_RUN_LOGGER = "prefect.task_runs"
_ENGINE_MESSAGE = "Engine execution exited with unexpected exception"


class ReturnedFailureFilter(logging.Filter):
    """Drops the engine's traceback of a Failed state the flow returned (the run's own one line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FailedRun) and record.getMessage() == _ENGINE_MESSAGE)


class ReturnedFailedStateFilter(logging.Filter):
    """Drops the task engine's "Task run failed with state: Failed(message=…)" of a Failed state a
    task returned (a pair's bad input): logged with exc_info=True and no exception in flight, it
    printed a stray "NoneType: None" under it, and "Finished in state Failed('…')" follows with the
    same message. A raised exception's record carries the exception, and is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        empty = bool(record.exc_info) and record.exc_info[0] is None
        return not (empty and record.getMessage().startswith("Task run failed with state"))


class CredentialsFilter(logging.Filter):
    """A URL's ``user:password@`` out of a record's message and traceback: an httpx error logged as
    "could not create the progress artifact: Server error '500' for url 'http://alice:…@…/api/…'"
    put PREFECT_API_URL's password in the run's logs, on the API and in the UI."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call ("%d", "x"): the handler reports it, as it always did
            return True
        if (hidden := hide_userinfo(message)) != message:
            record.msg, record.args = hidden, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if (hidden := hide_userinfo(text)) != text:
                # formatted once here, as a handler's Formatter would; the exception itself goes, or
                # Prefect's JSON formatter would serialize str(exc) from it again
                record.exc_text, record.exc_info = hidden, None
        return True


def quiet_returned_failures() -> None:
    """Install the filters on the flow-run and task-run loggers, once per process."""
    for name, kind in ((FLOW_RUN_LOGGER, ReturnedFailureFilter), (TASK_RUN_LOGGER, ReturnedFailedStateFilter),
                       (FLOW_RUN_LOGGER, CredentialsFilter), (TASK_RUN_LOGGER, CredentialsFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
