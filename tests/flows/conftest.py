"""Flow tests run against a real (temporary) Prefect API for the whole session."""

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=90):
        yield
