"""A throw-away PostgreSQL server for tests: initdb in a temporary directory, a free loopback port, stopped and
removed afterwards. Skips, with one line, where the server binaries or the psycopg2 driver are not installed."""

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from local_servers import free_port


def server_binaries() -> Path | None:
    """The newest Debian `postgresql` server installation (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: there they run as the `postgres` user."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] if os.geteuid() == 0 else []


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the server's SQLAlchemy URL (database `mlflow`, user `mlflow`, psycopg2), as the templates name it."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server not installed (Debian package `postgresql`)")
    pytest.importorskip("psycopg2", reason="psycopg2 not installed (dev extra: psycopg2-binary)")
    data = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: the server's socket lives here
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    run = lambda *words: subprocess.run([*as_postgres(), *words], check=True, capture_output=True)  # noqa: E731
    try:
        run(str(binaries / "initdb"), "-D", str(data / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data / "db"),
            "-l",
            str(data / "log"),
            "-w",
            "-t",
            "120",
            "start",
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        )
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_postgres(), str(binaries / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)
