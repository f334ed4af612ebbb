"""Fixtures that run real `mlflow server` processes on 127.0.0.1.

Registered as a plugin by `pytest_plugins` in tests/conftest.py. `mlflow_server` is one server
shared by the whole session. Tests that need a server of their own (for example to stop it)
call `mlflow_server_factory()`. Every server started here is stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from mlflow_server import MlflowServer, start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], MlflowServer]]:
    """Return a function that starts a new server in its own temporary folder."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_factory: Callable[[], MlflowServer]) -> MlflowServer:
    """One lean `mlflow server` shared by the session; its tracking URI is `.url`."""
    return mlflow_server_factory()
