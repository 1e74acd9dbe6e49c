"""A real PostgreSQL cluster and MLflow tracking server on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    """{tracking_uri, backend_store_uri, optuna_storage, root} of one fresh server for these tests."""
    from mammodp.errors import ConfigError
    from mammodp.server import find_pg_bin, tracking_server

    try:
        find_pg_bin()
    except ConfigError as exc:
        if os.environ.get("CI"):  # .ci/run installs Debian's postgresql: never skip there
            raise
        pytest.skip(str(exc))
    # Not under pytest's 0700 temp root: as root, the cluster runs as the `postgres` user.
    root = Path(tempfile.mkdtemp(prefix="mammodp-server-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        with tracking_server(root, port=free_port(), pg_port=free_port(), workers=1, timeout_s=600) as uris:
            yield {**uris, "root": root}
    finally:
        shutil.rmtree(root, ignore_errors=True)
