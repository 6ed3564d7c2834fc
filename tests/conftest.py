import pytest

from lib.session import build_session


@pytest.fixture(scope="session")
def spark():
    session = build_session("listing-similarity-tests", "local[2]", shuffle_partitions=2, ui=False)
    yield session
    session.stop()
