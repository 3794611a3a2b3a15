"""A Failed state the flow returned is one line in the run's logs; raised errors keep their traceback.
(Through a real worker: tests/deployments/test_production_e2e.py, refused runs.)"""

import logging
import sys

from prefect.exceptions import FailedRun

import flows.batch  # noqa: F401  (installs the filter, as a worker importing the flow does)
from flows.quiet import FLOW_RUN_LOGGER, TASK_RUN_LOGGER


def _records(logger_name: str, action) -> list[logging.LogRecord]:
    """The records that pass ``logger_name``'s filters while ``action()`` runs."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        action()
    finally:
        logger.removeHandler(handler)
    return seen


def _logged(exc: BaseException, message: str = "Engine execution exited with unexpected exception") -> list:
    def log() -> None:
        try:
            raise exc
        except BaseException:
            logging.getLogger(FLOW_RUN_LOGGER).error(message, exc_info=sys.exc_info())

    return _records(FLOW_RUN_LOGGER, log)


def test_the_engines_traceback_of_a_returned_failed_state_is_dropped():
    """Old: after "Finished in state Failed('preflight failed: …')" the engine logged a 40-line
    "Engine execution exited with unexpected exception" traceback of FailedRun."""
    assert _logged(FailedRun("preflight failed: output s3://b/o/ is not writable")) == []


def test_other_errors_keep_their_traceback():
    assert len(_logged(ValueError("a bug"))) == 1
    assert len(_logged(FailedRun("x"), message="something else")) == 1


def test_a_pair_task_that_returns_failed_logs_one_line_without_an_empty_traceback(prefect_api):
    """A pair task ends Failed by returning a Failed state with the one line that names the input.
    Prefect's task engine then logged "Task run failed with state: Failed(message=…, type=FAILED,
    result=None)" with exc_info=True and no exception: a stray "NoneType: None" line under it,
    before "Finished in state Failed('…')" said the same again."""
    from prefect import flow, task
    from prefect.states import Failed

    @task
    def pair():
        return Failed(message="/data/in/empty.jpg: file is empty (0 bytes)")

    @flow
    def run():
        pair(return_state=True)

    text = "\n".join(logging.Formatter().format(r) for r in _records(TASK_RUN_LOGGER, run))
    assert "NoneType: None" not in text and "Task run failed with state" not in text, text
    assert "Finished in state Failed('/data/in/empty.jpg: file is empty (0 bytes)')" in text, text


def test_a_task_that_raises_keeps_its_traceback(prefect_api):
    from prefect import flow, task

    @task
    def pair():
        raise ValueError("a bug in a task")

    @flow
    def run():
        pair(return_state=True)

    records = _records(TASK_RUN_LOGGER, run)
    assert any(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in records), records


def test_credentials_in_a_run_log_line_or_its_traceback_are_hidden():
    """An httpx error quotes its request's URL, PREFECT_API_URL's user:password@ with it: the warnings
    that log the Prefect client's errors ("could not create the progress artifact: Server error '500'
    for url 'http://alice:…@…/api/…'") put the password in the run's logs, on the API and the UI."""
    url = "http://alice:s3cret@127.0.0.1:4200/api/artifacts"

    def log() -> None:
        logger = logging.getLogger(FLOW_RUN_LOGGER)
        logger.warning("could not create the progress artifact: %s", f"Server error '500' for url '{url}'")
        try:
            raise RuntimeError(f"for url '{url}'")
        except RuntimeError:
            logger.error("failed", exc_info=sys.exc_info())

    from prefect.logging.formatters import JsonFormatter

    records = _records(FLOW_RUN_LOGGER, log)
    shown = [f.format(r) for r in records for f in (logging.Formatter(), JsonFormatter("default", None, "%"))]
    assert len(shown) == 4 and not any("s3cret" in line for line in shown), shown
    assert "http://127.0.0.1:4200/api/artifacts" in shown[0] and "for url 'http://127.0.0.1" in shown[2]
    # a malformed call passes on to the handlers, which report it: the filter never raises in the caller
    from flows.quiet import CredentialsFilter

    assert CredentialsFilter().filter(logging.LogRecord(FLOW_RUN_LOGGER, logging.INFO, "", 0, "%d", ("x",), None))
