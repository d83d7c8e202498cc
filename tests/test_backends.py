"""Backends of the shared test stack (nvo3/containers.py), checked without Docker.

Local processes are the default; ``NVO3_BACKEND=testcontainers`` runs compose.yaml's
server images in Docker. Here, where there is no Docker, asking for it must fail at
once with a clear error: not a skip, not a hang.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvo3 import containers
from nvo3.containers import (
    BACKEND_ENV,
    BackendUnavailable,
    ContainerServers,
    backend_name,
    compose_images,
    session_servers,
)
from nvo3.servers import LocalServers

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
NO_DOCKER = "unix:///nonexistent/nvo3-test/docker.sock"
NO_DOCKER_TCP = "tcp://127.0.0.1:9"  # discard port: nothing listens


def test_local_processes_are_the_default() -> None:
    assert backend_name({}) == "local"
    assert backend_name({BACKEND_ENV: ""}) == "local"
    assert isinstance(session_servers({}), LocalServers)
    assert isinstance(session_servers({BACKEND_ENV: "testcontainers"}), ContainerServers)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of local, testcontainers"):
        backend_name({BACKEND_ENV: "docker"})


def test_the_containers_are_compose_yamls_server_images() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    server_images = {svc["image"] for svc in services.values() if svc["image"] != "nvo3:local"}
    backend = ContainerServers()
    assert set(backend.images.values()) == server_images
    assert backend.nats_image.startswith("nats:")
    assert backend.etcd_image.startswith("gcr.io/etcd-development/etcd:")
    assert compose_images(COMPOSE) == backend.images


def test_conflicting_images_in_compose_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["nats2"]["image"] = "nats:2.10.0-alpine"
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(data))
    conflict = re.escape("nats2 runs nats-server from nats:2.10.0-alpine")
    with pytest.raises(ValueError, match=conflict):
        compose_images(tmp_path / "compose.yaml")


def _fake_testcontainers(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """testcontainers as if installed, with docker-py's failure when no daemon answers."""

    class DockerClient:
        def __init__(self, **kwargs: Any) -> None:
            raise error

    module = types.ModuleType("testcontainers.core.docker_client")
    module.DockerClient = DockerClient  # type: ignore[attr-defined]
    real = containers.importlib.import_module

    def import_module(name: str) -> Any:
        return module if name == "testcontainers.core.docker_client" else real(name)

    monkeypatch.setattr(containers.importlib, "import_module", import_module)


def _installed() -> bool:
    try:
        __import__("testcontainers.core.docker_client")
    except ImportError:
        return False
    return True


def test_testcontainers_without_docker_fails_at_once(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.testcontainers.properties
    backend = ContainerServers()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        backend.start()
    assert time.monotonic() - started < 30
    message = str(caught.value)
    if _installed():
        assert f"needs a running Docker daemon, and none answers at {NO_DOCKER}" in message
    else:
        assert "needs the 'testcontainers' package" in message
        assert "pip install -e '.[containers]'" in message
    with pytest.raises(RuntimeError, match="not running"):
        _ = backend.nats_urls


@pytest.mark.parametrize(("host", "why"), [
    (NO_DOCKER, "no such socket"),
    (NO_DOCKER_TCP, "Error while fetching server API version"),
])
def test_no_docker_daemon_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, host: str,
                                           why: str) -> None:
    """The Docker check itself, with testcontainers present (faked if not installed)."""
    monkeypatch.setenv("DOCKER_HOST", host)
    _fake_testcontainers(monkeypatch, RuntimeError(
        "Error while fetching server API version: ('Connection aborted.', "
        "ConnectionRefusedError(111, 'Connection refused'))"))
    with pytest.raises(BackendUnavailable, match=re.escape(
            f"needs a running Docker daemon, and none answers at {host}: {why}")):
        ContainerServers().start()


def test_the_session_stack_comes_from_the_selected_backend(servers: Any) -> None:
    want = LocalServers if backend_name() == "local" else ContainerServers
    assert isinstance(servers, want)
    assert servers.nats_urls
    assert servers.etcd_endpoints


def test_the_fixtures_error_out_without_docker(tmp_path: Path) -> None:
    """``NVO3_BACKEND=testcontainers pytest ...`` here: an error in setup, reported as such."""
    env = {**os.environ, BACKEND_ENV: "testcontainers", "DOCKER_HOST": NO_DOCKER,
           "HOME": str(tmp_path)}
    test = f"{Path(__file__).name}::test_the_session_stack_comes_from_the_selected_backend"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=120,
        check=False)
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout
    assert "skipped" not in done.stdout
    assert "BackendUnavailable" in done.stdout
