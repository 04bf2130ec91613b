"""A throwaway local PostgreSQL server for the ledger's tests (imported by tests/test_ledger.py).

``initdb`` into a fresh temporary directory, ``pg_ctl start`` on a free loopback port (and a Unix socket in that
directory) with trust authentication, one database per test, ``pg_ctl stop`` and removal at the end. PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` system user (created by Debian's
``postgresql`` package). Install the server with ``make test-deps`` (Debian: ``apt-get install -y postgresql``).

If the binaries are missing the tests FAIL with that instruction; set ``JAXDP_SKIP_POSTGRES=1`` to skip them.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

SKIP_ENV = "JAXDP_SKIP_POSTGRES"


def pg_bindir() -> str | None:
    """Directory with initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    for tool in ("pg_ctl", "initdb"):
        found = shutil.which(tool)
        if found:
            d = os.path.dirname(os.path.realpath(found))
            if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
                return d
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(cands[-1]) if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server():
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: PostgreSQL ledger tests skipped")
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found. Install them with `make test-deps` "
                    "(Debian/Ubuntu: apt-get install -y postgresql), or set JAXDP_SKIP_POSTGRES=1 to skip the "
                    "PostgreSQL ledger tests", pytrace=False)
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg 3 is missing: pip install 'jaxdp[postgres]' (or set JAXDP_SKIP_POSTGRES=1)",
                    pytrace=False)
    base = tempfile.mkdtemp(prefix="jaxdp-pg-")
    run_as: dict = {}
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres system user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            pytest.fail("running as root and there is no 'postgres' user to run the test server as; install "
                        "Debian's postgresql package (it creates the user) or run the tests as a normal user",
                        pytrace=False)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, log = os.path.join(base, "data"), os.path.join(base, "server.log")
    env = dict(os.environ, LC_ALL="C", LANG="C")

    def run(*cmd):
        return subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=120, **run_as)

    port = _free_port()
    r = run(os.path.join(bindir, "initdb"), "-D", data, "-U", "jaxdp", "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{r.stdout}\n{r.stderr}", pytrace=False)
    opts = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=50")
    r = run(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o", opts, "start")
    if r.returncode != 0:
        tail = open(log).read()[-2000:] if os.path.exists(log) else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n{tail}", pytrace=False)
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "jaxdp", "psycopg": psycopg}
    finally:
        run(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """URL of a fresh, empty schema on the throwaway server (``search_path`` set in the URL; a new schema is
    much faster to make than a new database)."""
    name = "t_" + uuid.uuid4().hex[:12]
    base = f"postgresql://{pg_server['user']}@{pg_server['host']}:{pg_server['port']}/postgres"
    with pg_server["psycopg"].connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{base}?options=-csearch_path%3D{name}"
