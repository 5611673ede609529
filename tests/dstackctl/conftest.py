"""Fixtures for dstackctl tests: a short socket directory and a fake daemon."""

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.dstackctl.fake_daemon import FakeDaemon


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A directory under /tmp, since AF_UNIX paths are limited to about 108 bytes."""
    directory = tempfile.mkdtemp(prefix="dctl-", dir="/tmp")
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def fake_daemon(socket_dir: str) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(os.path.join(socket_dir, "d.sock"))
    fake.start()
    yield fake
    fake.stop()
