"""The shared tracking server: PostgreSQL as MLflow's backend store, proxied artifacts.

`mammodp server` (and `make server`) starts, on this machine:

1. a PostgreSQL cluster (Debian's `postgresql` server binaries; `initdb` on first use) with
   the databases `mlflow` (runs and registry) and `optuna` (tuning studies), and
2. `mlflow server --backend-store-uri postgresql://.../mlflow --artifacts-destination DIR`.

Clients (every stage, DVC queue workers, other machines) then set
`MLFLOW_TRACKING_URI=http://HOST:PORT` and `tune.storage: postgresql://USER@HOST:PGPORT/optuna`.
Artifacts go through the server (`mlflow-artifacts:/...` URIs in the store), so no client's
local path is ever written into the shared store.

The PostgreSQL cluster here is for a trusted network: it accepts its one role without a
password from the address it listens on. For a consortium, point `--backend-store-uri` at a
managed PostgreSQL with TLS and passwords (the MLflow server runs the same).
PostgreSQL refuses to run as root: as root, the server commands run as the `postgres` user
that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mammodp.errors import ConfigError

PG_USER = "mammodp"  # the cluster's database role (superuser of this private cluster)
DATABASES = ("mlflow", "optuna")


def find_pg_bin() -> Path:
    """The folder holding `initdb`, `pg_ctl` and `postgres` (PATH first, then Debian's layout).

    Raises:
        ConfigError: no PostgreSQL server is installed (`apt-get install postgresql`).
    """
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "pg_ctl").is_file() and (d / "initdb").is_file():
            return d
    raise ConfigError("no PostgreSQL server found (initdb, pg_ctl); install it with "
                      "`apt-get install postgresql`", field="server")


@dataclass
class Postgres:
    """A PostgreSQL cluster in `data_dir`, listening on host:port over TCP only.

    Args:
        data_dir: the cluster's folder (created by `init`); its parent holds the log.
        port: TCP port.
        host: address to listen on (127.0.0.1 unless other machines must reach it).
        os_user: the OS user the server runs as when this process is root (PostgreSQL
            refuses root); None = `postgres` when root, else the current user.
    """

    data_dir: Path
    port: int = 5432
    host: str = "127.0.0.1"
    os_user: str | None = None

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).resolve()
        self.bin = find_pg_bin()
        if self.os_user is None and os.geteuid() == 0:
            self.os_user = "postgres"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of a database of this cluster (SQLAlchemy 2.1's default driver: psycopg 3)."""
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        if self.os_user is None:
            return list(args)
        return ["runuser", "-u", self.os_user, "--", *args]

    def _run(self, *args: str) -> None:
        res = subprocess.run(self._cmd(*args), capture_output=True, text=True)
        if res.returncode != 0:
            raise ConfigError(f"{' '.join(args[:2])} failed: {(res.stderr or res.stdout).strip()[-800:]}",
                              path=self.data_dir)

    def _own(self) -> None:
        """Give the server's OS user the cluster's folder (PostgreSQL insists on owning it)."""
        if self.os_user is None:
            return
        try:
            user = pwd.getpwnam(self.os_user)
        except KeyError as exc:
            raise ConfigError(f"PostgreSQL cannot run as root and there is no {self.os_user!r} user "
                              "(apt-get install postgresql creates it)", field="server") from exc
        for p in (self.data_dir.parent, self.data_dir):
            if p.exists():
                os.chown(p, user.pw_uid, user.pw_gid)

    def init(self) -> None:
        """`initdb` the cluster if `data_dir` holds none yet."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._own()
        self._run(str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", PG_USER, "--auth=trust",
                  "--encoding=UTF8", "--no-instructions")

    def start(self, timeout_s: float = 60) -> None:
        """Start the server (TCP on host:port, no Unix socket) and create the databases."""
        self.init()
        self._own()
        self.log_file.touch()
        if self.os_user is not None:
            user = pwd.getpwnam(self.os_user)
            os.chown(self.log_file, user.pw_uid, user.pw_gid)
        opts = f"-p {self.port} -h {self.host} -k ''"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts,
                  "-w", "-t", str(int(timeout_s)), "start")
        for db in DATABASES:
            self.create_database(db)

    def create_database(self, name: str) -> None:
        """Create a database unless it exists."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=PG_USER, dbname="postgres",
                             autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed)."""
        if (self.data_dir / "postmaster.pid").is_file():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


def mlflow_server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                          port: int = 5000, workers: int = 2) -> list[str]:
    """The `mlflow server` command line: runs and registry in the backend, artifacts proxied."""
    dest = artifacts_destination
    if "://" not in dest:
        dest = str(Path(dest).resolve())  # the server's own disk; clients only see mlflow-artifacts:/
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", dest, "--serve-artifacts", "--host", host, "--port", str(port),
            "--workers", str(workers)]


def wait_for_http(url: str, timeout_s: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 200.

    Raises:
        ConfigError: the server exited or did not answer in time.
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"the server exited with code {proc.returncode} before answering {url}",
                              field="server")
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"no answer from {url} within {timeout_s:.0f} s", field="server")


@contextlib.contextmanager
def tracking_server(root: Path, *, host: str = "127.0.0.1", port: int = 5000, pg_port: int = 5432,
                    backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                    log: Path | None = None, workers: int = 2,
                    timeout_s: float = 300) -> Iterator[dict[str, str]]:
    """Run PostgreSQL (unless `backend_store_uri` names another) and an MLflow server; yield URIs.

    Args:
        root: folder for the cluster (`root/postgres`), its log and, by default, the artifacts
            (`root/artifacts`).
        host, port: where the MLflow server listens.
        pg_port: the PostgreSQL port (local cluster only).
        backend_store_uri: an existing database URL; None = start the local cluster.
        artifacts_destination: folder or object-store URI for artifacts.
        log: the MLflow server's log file (default `root/mlflow-server.log`).
        workers: MLflow server worker processes.
        timeout_s: how long to wait for the server's first answer (it migrates its schema first).

    Yields:
        {"tracking_uri": http://host:port, "backend_store_uri": ..., "optuna_storage": ...}.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pg = None
    if backend_store_uri is None:
        # Loopback only: other machines reach the runs through the MLflow server (HTTP); for an
        # Optuna study shared across machines, give tune.storage a PostgreSQL they can reach.
        pg = Postgres(root / "postgres", port=pg_port)
        pg.start()
        backend_store_uri = pg.url("mlflow")
    artifacts = artifacts_destination or str(root / "artifacts")
    log = log or root / "mlflow-server.log"
    proc = None
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(mlflow_server_command(backend_store_uri, artifacts, host, port, workers),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"http://{host}:{port}/health", timeout_s=timeout_s, proc=proc)
        yield {"tracking_uri": f"http://{host}:{port}", "backend_store_uri": backend_store_uri,
               "optuna_storage": pg.url("optuna") if pg is not None else ""}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        if pg is not None:
            pg.stop()


__all__ = ["DATABASES", "PG_USER", "Postgres", "find_pg_bin", "mlflow_server_command", "tracking_server",
           "wait_for_http"]
