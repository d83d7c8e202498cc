"""Where the integration fixtures' servers run: local processes, or Docker containers.

``NVO3_BACKEND`` selects the backend of the shared test stack (``tests/conftest.py``):

``local`` (the default)
    :class:`nvo3.servers.LocalServers`: the venv's nats-server and etcd binaries on
    free loopback ports. Needs no Docker.
``testcontainers``
    :class:`ContainerServers`: one nats-server and one etcd container, started with
    `testcontainers <https://testcontainers-python.readthedocs.io>`_ from the very
    images compose.yaml runs (read from the file, so the two cannot drift). Needs the
    ``testcontainers`` package (``pip install -e '.[containers]'``) and a Docker
    daemon; without either, :meth:`ContainerServers.start` raises
    :class:`BackendUnavailable` at once, saying which is missing.

Both are plain (no TLS), like ``LocalServers()``; fixtures that start their own
servers (clusters, the secured stack) stay local.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from nvo3.servers import LocalServers

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "BackendUnavailable",
    "ContainerServers",
    "backend_name",
    "compose_images",
    "session_servers",
]

BACKEND_ENV = "NVO3_BACKEND"
BACKENDS = ("local", "testcontainers")
#: The repository's compose file (the fixtures run from a checkout).
COMPOSE_FILE = Path(__file__).resolve().parent.parent / "compose.yaml"
NATS_PORT, NATS_MONITOR_PORT, ETCD_PORT = 4222, 8222, 2379
READY_TIMEOUT = 60.0
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_INSTALL_HINT = "pip install -e '.[containers]'"


class BackendUnavailable(RuntimeError):
    """The selected backend cannot run here (package or Docker daemon missing)."""


def backend_name(environ: Mapping[str, str] = os.environ) -> str:
    name = environ.get(BACKEND_ENV, "").strip() or "local"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def session_servers(environ: Mapping[str, str] = os.environ) -> LocalServers | ContainerServers:
    """The shared test stack of the selected backend, not started yet."""
    return LocalServers() if backend_name(environ) == "local" else ContainerServers()


def compose_images(compose_file: Path = COMPOSE_FILE) -> dict[str, str]:
    """``{"nats-server": image, "etcd": image}``: what compose.yaml runs each server from."""
    data = yaml.safe_load(compose_file.read_text())
    images: dict[str, str] = {}
    for name, svc in data["services"].items():
        command = svc.get("command")
        program = Path(command[0]).name if isinstance(command, list) and command else None
        if program not in ("nats-server", "etcd"):
            continue
        if images.setdefault(program, svc["image"]) != svc["image"]:
            raise ValueError(f"{compose_file}: {name} runs {program} from {svc['image']}, "
                             f"other services from {images[program]}")
    missing = {"nats-server", "etcd"} - set(images)
    if missing:
        raise ValueError(f"{compose_file}: no service runs {', '.join(sorted(missing))}")
    return images


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"{BACKEND_ENV}=testcontainers needs the 'testcontainers' package ({exc}); "
            f"install it with: {_INSTALL_HINT}") from None


@dataclass(frozen=True)
class ContainerMember:
    url: str
    monitor_url: str


@dataclass(frozen=True)
class ContainerCluster:
    """The shape of ``LocalServers().nats`` that the fixtures use: ``members[i].url``."""

    members: tuple[ContainerMember, ...]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]


class ContainerServers:
    """One nats-server (JetStream, monitoring) and one etcd, as Docker containers."""

    def __init__(self, compose_file: Path = COMPOSE_FILE, *,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        images = compose_images(compose_file)
        self.nats_image = images["nats-server"]
        self.etcd_image = images["etcd"]
        self.ready_timeout = ready_timeout
        self.nats: ContainerCluster | None = None
        self._etcd_endpoint: str | None = None
        self._containers: list[Any] = []

    def __repr__(self) -> str:
        return f"<ContainerServers {self.nats_image} {self.etcd_image}>"

    @property
    def images(self) -> dict[str, str]:
        return {"nats-server": self.nats_image, "etcd": self.etcd_image}

    @property
    def nats_urls(self) -> list[str]:
        if self.nats is None:
            raise RuntimeError("ContainerServers is not running; call start() or use `with`")
        return self.nats.urls

    @property
    def etcd_endpoints(self) -> list[str]:
        if self._etcd_endpoint is None:
            raise RuntimeError("ContainerServers is not running; call start() or use `with`")
        return [self._etcd_endpoint]

    @staticmethod
    def check_docker() -> None:
        """BackendUnavailable unless testcontainers is installed and Docker answers."""
        docker_client = _import("testcontainers.core.docker_client")
        find_host = getattr(docker_client, "get_docker_host", None)
        host = (find_host() if find_host is not None else os.environ.get("DOCKER_HOST")) or (
            DEFAULT_DOCKER_HOST)

        def unavailable(why: object) -> BackendUnavailable:
            return BackendUnavailable(
                f"{BACKEND_ENV}=testcontainers needs a running Docker daemon, and none "
                f"answers at {host}: {why}. Unset {BACKEND_ENV} to use local processes.")

        # A missing socket is the common case (no Docker installed): say so without
        # docker-py, whose failed connection would also leak its socket.
        if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
            raise unavailable("no such socket")
        try:
            docker_client.DockerClient(timeout=10).client.ping()
        except Exception as exc:
            raise unavailable(exc) from None

    def start(self) -> Self:
        self.check_docker()
        container = _import("testcontainers.core.container")
        waiting = _import("testcontainers.core.waiting_utils")
        try:
            nats = (container.DockerContainer(self.nats_image)
                    .with_command(["nats-server", "-js", "-m", str(NATS_MONITOR_PORT)])
                    .with_exposed_ports(NATS_PORT, NATS_MONITOR_PORT))
            self._containers.append(nats)
            nats.start()
            etcd = (container.DockerContainer(self.etcd_image)
                    .with_command(["/usr/local/bin/etcd", "--name=etcd",
                                   "--data-dir=/var/lib/etcd/data",
                                   f"--listen-client-urls=http://0.0.0.0:{ETCD_PORT}",
                                   f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}"])
                    .with_exposed_ports(ETCD_PORT))
            self._containers.append(etcd)
            etcd.start()
            waiting.wait_for_logs(nats, "Server is ready", timeout=self.ready_timeout)
            waiting.wait_for_logs(etcd, "ready to serve client requests",
                                  timeout=self.ready_timeout)
            host = nats.get_container_host_ip()
            self.nats = ContainerCluster((ContainerMember(
                f"nats://{host}:{nats.get_exposed_port(NATS_PORT)}",
                f"http://{host}:{nats.get_exposed_port(NATS_MONITOR_PORT)}"),))
            self._etcd_endpoint = (f"{etcd.get_container_host_ip()}:"
                                   f"{etcd.get_exposed_port(ETCD_PORT)}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Removes every container started here; safe to call more than once."""
        while self._containers:
            self._containers.pop().stop()
        self.nats = None
        self._etcd_endpoint = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
