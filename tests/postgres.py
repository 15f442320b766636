"""A throw-away PostgreSQL cluster for tests and benchmarks: initdb in a temp folder, listening
on 127.0.0.1 only, on a free port; stopped and deleted afterwards. As root (CI), the server runs
as the ``postgres`` system user, since PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them out of PATH), or None."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cluster(user: str = "tacnas", db: str = "tacnas"):
    """Yield a ``postgresql://`` URL (psycopg 3 under SQLAlchemy 2) to a fresh database."""
    bins = bindir()
    if bins is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb); "
                           "Debian: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="tacnas-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()

    def run(*cmd):
        p = subprocess.run([*prefix, *map(str, cmd)], capture_output=True, text=True, cwd=root)
        if p.returncode:
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {p.stderr.strip()[-500:]}")

    try:
        run(bins / "initdb", "-D", data, "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off " \
               "-c max_connections=100"
        run(bins / "pg_ctl", "-D", data, "-o", opts, "-l", root / "log", "-w", "start")
        run(bins / "createdb", "-h", "127.0.0.1", "-p", port, "-U", user, db)
        yield f"postgresql://{user}@127.0.0.1:{port}/{db}"
    finally:
        subprocess.run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, cwd=root)
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
