"""Storage for the ledger: one append-only, hash-chained log table in SQLite or PostgreSQL.

Tables (same on both back ends):

* ``ledger_log(seq, ts, kind, dataset_id, run_id, payload, prev_hash, hash)`` -- the history. ``seq`` runs
  1, 2, 3, ... without gaps; ``hash = sha256(canonical([seq, ts, kind, dataset_id, run_id, payload, prev_hash]))``
  and ``prev_hash`` is the previous row's hash (64 zeros for row 1). Triggers refuse UPDATE and DELETE.
* ``ledger_head(id = 1, seq, hash)`` -- the last row, written in the same transaction as each append, so that
  cutting rows off the end is detected too.
* ``ledger_meta(key, value)`` -- format name and schema version.

Writers serialise on one lock for the whole read-decide-append transaction: SQLite ``BEGIN IMMEDIATE`` (the
database write lock) and PostgreSQL ``pg_advisory_xact_lock``. Two processes reserving at once therefore see
each other's reservations and can never jointly overspend.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

from jaxdp import _checks

FORMAT = "jaxdp-ledger"
SCHEMA_VERSION = "1"
GENESIS = "0" * 64
_PG_LOCK_KEY = 0x6A617864704C6467  # "jaxdpLdg": advisory lock id shared by every writer of one database


class LedgerError(ValueError):
    """Base class of the ledger's errors (a ``ValueError`` so the CLI prints it as a plain error)."""


class LedgerStoreError(LedgerError):
    """The store cannot be opened or read (missing, not a ledger, corrupt, server unreachable).

    Nothing has been written when this is raised."""


class LedgerIntegrityError(LedgerError):
    """The hash chain does not verify: a row was edited, deleted or inserted outside the ledger."""


@dataclass(frozen=True)
class Row:
    seq: int
    ts: str
    kind: str
    dataset_id: str | None
    run_id: str | None
    payload: str
    prev_hash: str
    hash: str

    def as_dict(self) -> dict:
        return {"seq": self.seq, "ts": self.ts, "kind": self.kind, "dataset_id": self.dataset_id,
                "run_id": self.run_id, "payload": self.payload, "prev_hash": self.prev_hash, "hash": self.hash}


def row_hash(seq: int, ts: str, kind: str, dataset_id: str | None, run_id: str | None, payload: str,
             prev_hash: str) -> str:
    text = json.dumps([seq, ts, kind, dataset_id, run_id, payload, prev_hash], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_rows(rows: list[Row], head: tuple[int, str] | None) -> list[str]:
    """Problems found in the chain (empty list: intact). Checks seq contiguity, each row's hash, each link,
    and that the head record names the last row."""
    problems = []
    prev = GENESIS
    for i, r in enumerate(rows):
        if r.seq != i + 1:
            problems.append(f"row seq {r.seq}: expected seq {i + 1} (a row before it was deleted or inserted)")
        if r.prev_hash != prev:
            problems.append(f"row seq {r.seq}: prev_hash does not match the hash of the row before "
                            "(a row was deleted, inserted or edited)")
        h = row_hash(r.seq, r.ts, r.kind, r.dataset_id, r.run_id, r.payload, r.prev_hash)
        if h != r.hash:
            problems.append(f"row seq {r.seq}: content does not match its hash (the row was edited)")
        prev = r.hash
    if head is None:
        if rows:
            problems.append("the head record is missing (ledger_head was edited)")
    else:
        last = (rows[-1].seq, rows[-1].hash) if rows else (0, GENESIS)
        if tuple(head) != last:
            problems.append(f"head record says the last row is seq {head[0]} but the log ends at seq {last[0]} "
                            "(rows were deleted from the end, or the head was edited)")
    return problems


_DDL = [
    "CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ledger_log (seq BIGINT PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, "
    "dataset_id TEXT, run_id TEXT, payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS ledger_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, "
    "hash TEXT NOT NULL)",
]
_SQLITE_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS ledger_log_no_update BEFORE UPDATE ON ledger_log "
    "BEGIN SELECT RAISE(ABORT, 'ledger_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS ledger_log_no_delete BEFORE DELETE ON ledger_log "
    "BEGIN SELECT RAISE(ABORT, 'ledger_log is append-only'); END",
    # INSERT OR REPLACE deletes the conflicting row without firing the DELETE trigger (unless
    # recursive_triggers is on): a BEFORE INSERT trigger runs before conflict resolution, so only appending the
    # next seq onto the current last row's hash is accepted -- no replace, no insert in the middle.
    "CREATE TRIGGER IF NOT EXISTS ledger_log_append_at_end BEFORE INSERT ON ledger_log "
    "WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger_log) "
    "OR NEW.prev_hash IS NOT COALESCE((SELECT hash FROM ledger_log ORDER BY seq DESC LIMIT 1), '" + "0" * 64 + "') "
    "BEGIN SELECT RAISE(ABORT, 'ledger_log is append-only: rows are only appended after the last one'); END",
    # the head record may only name the log's last row
    "CREATE TRIGGER IF NOT EXISTS ledger_head_follows_log BEFORE UPDATE ON ledger_head "
    "WHEN NEW.id IS NOT 1 OR NEW.seq IS NOT (SELECT MAX(seq) FROM ledger_log) "
    "OR NEW.hash IS NOT (SELECT hash FROM ledger_log ORDER BY seq DESC LIMIT 1) "
    "BEGIN SELECT RAISE(ABORT, 'ledger_head only names the last row of ledger_log'); END",
    "CREATE TRIGGER IF NOT EXISTS ledger_head_insert_follows_log BEFORE INSERT ON ledger_head "
    "WHEN NEW.id IS NOT 1 OR NEW.seq IS NOT (SELECT MAX(seq) FROM ledger_log) "
    "OR NEW.hash IS NOT (SELECT hash FROM ledger_log ORDER BY seq DESC LIMIT 1) "
    "BEGIN SELECT RAISE(ABORT, 'ledger_head only names the last row of ledger_log'); END",
    "CREATE TRIGGER IF NOT EXISTS ledger_head_no_delete BEFORE DELETE ON ledger_head "
    "BEGIN SELECT RAISE(ABORT, 'ledger_head cannot be deleted'); END",
]
_PG_TRIGGERS = [
    "CREATE OR REPLACE FUNCTION jaxdp_ledger_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'ledger_log is append-only'; END $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS ledger_log_append_only ON ledger_log",
    "CREATE TRIGGER ledger_log_append_only BEFORE UPDATE OR DELETE ON ledger_log "
    "FOR EACH ROW EXECUTE FUNCTION jaxdp_ledger_append_only()",
    "DROP TRIGGER IF EXISTS ledger_log_no_truncate ON ledger_log",
    "CREATE TRIGGER ledger_log_no_truncate BEFORE TRUNCATE ON ledger_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION jaxdp_ledger_append_only()",
    "CREATE OR REPLACE FUNCTION jaxdp_ledger_append_at_end() RETURNS trigger AS $$ "
    "DECLARE last_seq BIGINT; last_hash TEXT; BEGIN "
    "SELECT seq, hash INTO last_seq, last_hash FROM ledger_log ORDER BY seq DESC LIMIT 1; "
    "IF NEW.seq IS DISTINCT FROM COALESCE(last_seq, 0) + 1 "
    "OR NEW.prev_hash IS DISTINCT FROM COALESCE(last_hash, '" + "0" * 64 + "') THEN "
    "RAISE EXCEPTION 'ledger_log is append-only: rows are only appended after the last one'; END IF; "
    "RETURN NEW; END $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS ledger_log_append_at_end ON ledger_log",
    "CREATE TRIGGER ledger_log_append_at_end BEFORE INSERT ON ledger_log "
    "FOR EACH ROW EXECUTE FUNCTION jaxdp_ledger_append_at_end()",
]

LOCK_WAIT_S = 60.0  # a writer waits at most this long for the write lock, then fails with a clear error


def lost_history_message(where: str, what: str) -> str:
    """The advice for a store that exists but has lost its ledger (never: "run init")."""
    return (f"{where} {what}: if it held a jaxdp ledger, that ledger's history is gone. Do NOT run "
            "`jaxdp ledger init` on it -- an empty ledger would give every dataset its whole budget back. Restore "
            "the ledger from a backup, or rebuild it from a JSON export with `jaxdp ledger restore --ledger "
            "NEW_PATH_OR_URL --from EXPORT.json` (docs/ledger.md, \"Recovering a lost ledger\")")


class Store:
    """A back end: ``transaction(write)`` yields an object with ``execute(sql, params) -> list of tuples``."""

    url: str

    def transaction(self, write: bool) -> contextlib.AbstractContextManager:  # pragma: no cover - interface
        raise NotImplementedError

    def ddl(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def refuse_init(self, tx) -> LedgerStoreError | None:  # pragma: no cover - interface
        raise NotImplementedError

    def install_triggers(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def grant_writer(self, role: str) -> None:
        raise LedgerError("a separate writer role is a PostgreSQL feature; a SQLite ledger is protected by the "
                          "file's permissions (see docs/ledger.md, threat model)")

    def close(self) -> None:  # pragma: no cover - interface
        pass

    # ------------------------------------------------------------------ shared logic
    def has_ledger_tables(self, tx) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def no_ledger_error(self, tx) -> LedgerStoreError:
        return LedgerStoreError(lost_history_message(self.url, "holds no ledger tables"))

    def check_schema(self, tx) -> None:
        if not self.has_ledger_tables(tx):
            raise self.no_ledger_error(tx)
        meta = dict(tx.execute("SELECT key, value FROM ledger_meta", ()))
        if meta.get("format") != FORMAT:
            raise LedgerStoreError(f"{self.url} is not a jaxdp ledger (format {meta.get('format')!r}); it was "
                                   "left untouched: point --ledger at the ledger")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise LedgerStoreError(f"{self.url}: ledger schema version {meta.get('schema_version')!r} is not "
                                   f"supported by this jaxdp (expects {SCHEMA_VERSION}); upgrade jaxdp")

    def read_rows(self, tx) -> tuple[list[Row], tuple[int, str] | None]:
        self.check_schema(tx)
        rows = [Row(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in tx.execute(
            "SELECT seq, ts, kind, dataset_id, run_id, payload, prev_hash, hash FROM ledger_log ORDER BY seq", ())]
        head = tx.execute("SELECT seq, hash FROM ledger_head WHERE id = 1", ())
        return rows, ((int(head[0][0]), head[0][1]) if head else None)

    def append(self, tx, last: Row | None, ts: str, kind: str, dataset_id: str | None, run_id: str | None,
               payload: str) -> Row:
        seq = last.seq + 1 if last else 1
        prev = last.hash if last else GENESIS
        h = row_hash(seq, ts, kind, dataset_id, run_id, payload, prev)
        tx.execute("INSERT INTO ledger_log (seq, ts, kind, dataset_id, run_id, payload, prev_hash, hash) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, ts, kind, dataset_id, run_id, payload, prev, h))
        if seq == 1:
            tx.execute("INSERT INTO ledger_head (id, seq, hash) VALUES (1, ?, ?)", (seq, h))
        else:
            tx.execute("UPDATE ledger_head SET seq = ?, hash = ? WHERE id = 1", (seq, h))
        return Row(seq, ts, kind, dataset_id, run_id, payload, prev, h)


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, params) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()


class SqliteStore(Store):
    def __init__(self, path: str, create: bool, timeout: float = 60.0):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.url = f"sqlite:///{self.path}"
        exists = os.path.exists(self.path)
        self.preexisting_size = os.path.getsize(self.path) if exists and os.path.isfile(self.path) else None
        if not exists and not create:
            raise LedgerStoreError(f"no ledger at {self.path}; create it with `jaxdp ledger init --ledger "
                                   f"{self.path}` (or Ledger.open(..., create=True))")
        if os.path.isdir(self.path):
            raise LedgerStoreError(f"{self.path} is a directory; give the ledger file's path")
        if exists and not os.access(self.path, os.R_OK):
            raise LedgerStoreError(f"cannot read the ledger {self.path} (permission denied)")
        try:
            # isolation_level=None: we issue BEGIN ourselves (BEGIN IMMEDIATE for writers).
            self.conn = sqlite3.connect(self.path, timeout=min(timeout, LOCK_WAIT_S), isolation_level=None)
            self.conn.execute(f"PRAGMA busy_timeout = {int(min(timeout, LOCK_WAIT_S) * 1000)}")
            self.conn.execute("PRAGMA schema_version").fetchall()  # reads the header: fails on a non-database
        except sqlite3.DatabaseError as e:
            raise LedgerStoreError(f"{self.path} is not a readable SQLite ledger ({e}); the file was left "
                                   "untouched. Restore it from a backup or an export, or point --ledger "
                                   "elsewhere") from e
        if not create:
            with self.transaction(write=False) as tx:
                self.check_schema(tx)

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_SqliteTx]:
        try:
            self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise LedgerStoreError(f"the ledger {self.path} is locked by another writer for more than "
                                       f"{LOCK_WAIT_S:g} s; nothing was written. Try again (`jaxdp ledger show` "
                                       "lists open reservations)") from e
            raise LedgerStoreError(f"cannot open a transaction on {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise LedgerStoreError(f"cannot open a transaction on {self.path}: {e}") from e
        try:
            yield _SqliteTx(self.conn)
        except sqlite3.DatabaseError as e:
            self._rollback()
            raise LedgerStoreError(f"the ledger {self.path} cannot be read or written ({e}); nothing was written. "
                                   "If it is corrupt, restore it from a backup or an export") from e
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise LedgerStoreError(f"cannot commit to {self.path}: {e}") from e

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # no transaction left to roll back (SQLite already ended it)

    def ddl(self) -> list[str]:
        return _DDL + _SQLITE_TRIGGERS

    def refuse_init(self, tx) -> LedgerStoreError | None:
        """A file that existed before ``init`` and is not a ledger (0 bytes, or another database) is never
        turned into an empty ledger: it may be a ledger whose history was lost."""
        if self.preexisting_size is None:
            return None
        err = self.no_ledger_error(tx)
        return LedgerStoreError(f"{err} To start a new ledger, give a path that does not exist yet.")

    def has_ledger_tables(self, tx) -> bool:
        return bool(tx.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_meta'", ()))

    def no_ledger_error(self, tx) -> LedgerStoreError:
        if self.preexisting_size == 0:
            what = "is an empty (0-byte) file"
        else:
            n = tx.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'", ())[0][0]
            what = "holds no ledger tables" + (f" ({n} other table(s): is it another database?)" if n else "")
        return LedgerStoreError(lost_history_message(self.path, what))

    def install_triggers(self) -> None:
        """(Re-)create the append-only triggers (idempotent; `jaxdp ledger init` on an existing ledger adds
        the ones an older jaxdp did not create)."""
        with self.transaction(write=True) as tx:
            for sql in _SQLITE_TRIGGERS:
                tx.execute(sql, ())

    def close(self) -> None:
        self.conn.close()


def init_meta(tx) -> None:
    meta = dict(tx.execute("SELECT key, value FROM ledger_meta", ()))
    if not meta:
        tx.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?)", ("format", FORMAT))
        tx.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?)", ("schema_version", SCHEMA_VERSION))


class _PgTx:
    def __init__(self, cur):
        self.cur = cur

    def execute(self, sql: str, params) -> list[tuple]:
        self.cur.execute(sql.replace("?", "%s"), params)
        return self.cur.fetchall() if self.cur.description else []


class PostgresStore(Store):
    def __init__(self, url: str, create: bool):
        try:
            import psycopg
        except ImportError as e:
            raise LedgerStoreError("a PostgreSQL ledger needs psycopg 3: pip install 'jaxdp[postgres]'") from e
        self._psycopg = psycopg
        self.url = _redact(url)
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=20)
        except psycopg.Error as e:
            raise LedgerStoreError(f"cannot connect to the ledger database {self.url}: {e}") from e
        if not create:
            with self.transaction(write=False) as tx:
                self.check_schema(tx)

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_PgTx]:
        import time
        psycopg = self._psycopg
        try:
            with self.conn.transaction():
                with self.conn.cursor() as cur:
                    tx = _PgTx(cur)
                    if write:
                        # One writer at a time for the whole read-decide-append (released at commit/rollback);
                        # the wait is bounded (LOCK_WAIT_S), never forever.
                        deadline = time.monotonic() + LOCK_WAIT_S
                        while True:
                            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
                            if _checks.present(cur.fetchone())[0]:   # the SELECT returns one row
                                break
                            if time.monotonic() > deadline:
                                raise LedgerStoreError(
                                    f"the ledger {self.url} is locked by another writer for more than "
                                    f"{LOCK_WAIT_S:g} s; nothing was written. Try again")
                            time.sleep(0.05)
                    else:
                        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    yield tx
        except psycopg.errors.UndefinedTable as e:
            raise LedgerStoreError(lost_history_message(self.url, "has lost (some of) its ledger tables")) from e
        except psycopg.errors.IntegrityError as e:  # e.g. UniqueViolation: a row or head that should not exist
            raise LedgerStoreError(f"ledger database {self.url} refused the write ({type(e).__name__}: {e}); "
                                   "nothing was written. Run `jaxdp ledger verify`") from e
        except psycopg.Error as e:
            raise LedgerStoreError(f"ledger database {self.url}: {type(e).__name__}: {e}; nothing was "
                                   "written") from e

    def ddl(self) -> list[str]:
        return _DDL + _PG_TRIGGERS

    def refuse_init(self, tx) -> LedgerStoreError | None:
        return None  # a database or schema without ledger tables is how a new PostgreSQL ledger starts

    def has_ledger_tables(self, tx) -> bool:
        return bool(tx.execute("SELECT to_regclass('ledger_meta') IS NOT NULL", ())[0][0])

    def no_ledger_error(self, tx) -> LedgerStoreError:
        return LedgerStoreError(
            f"{self.url} holds no jaxdp ledger tables. If this is a new database or schema, create a ledger with "
            "`jaxdp ledger init`. If a ledger was here, its history is gone: do NOT run init then (an empty ledger "
            "would give every dataset its whole budget back); restore it from a backup, or rebuild it from a JSON "
            "export with `jaxdp ledger restore --from EXPORT.json` (docs/ledger.md, \"Recovering a lost ledger\")")

    def install_triggers(self) -> None:
        with self.transaction(write=True) as tx:
            for sql in _PG_TRIGGERS:
                tx.execute(sql, ())

    def grant_writer(self, role: str) -> None:
        """Let ``role`` (a separate, non-owner role) use the ledger: read everything, append rows, move the head.
        Run by the tables' owner. The writer role cannot ALTER, DROP, TRUNCATE or disable the triggers (only an
        owner or superuser can), so the append-only rules hold against the role the trainers connect as."""
        from psycopg import sql
        r = sql.Identifier(role)
        with self.transaction(write=True) as tx:
            for stmt in (sql.SQL("REVOKE ALL ON ledger_log, ledger_head, ledger_meta FROM {}").format(r),
                         sql.SQL("GRANT SELECT ON ledger_log, ledger_head, ledger_meta TO {}").format(r),
                         sql.SQL("GRANT INSERT ON ledger_log TO {}").format(r),
                         sql.SQL("GRANT INSERT, UPDATE ON ledger_head TO {}").format(r)):
                tx.cur.execute(stmt)

    def close(self) -> None:
        self.conn.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_store(url_or_path: str | os.PathLike, create: bool = False) -> Store:
    """``postgresql://...`` / ``postgres://...`` -> PostgreSQL; ``sqlite:///path`` or a plain path -> SQLite."""
    s = os.fspath(url_or_path)
    if s.startswith(("postgresql://", "postgres://")):
        store: Store = PostgresStore(s, create=create)
    elif s.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        store = SqliteStore(s[len("sqlite:///"):], create=create)
    elif "://" in s:
        raise LedgerStoreError(f"unsupported ledger URL {_redact(s)!r}: use a file path, sqlite:///PATH or "
                               "postgresql://USER@HOST:PORT/DB")
    else:
        store = SqliteStore(s, create=create)
    return store


def canonical_payload(payload: dict) -> str:
    """Canonical JSON text of a row's payload (sorted keys; no NaN/inf: infinities are stored as "inf")."""
    def fix(v):
        if isinstance(v, float) and v != v:
            raise ValueError("NaN in a ledger payload")
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v
    return json.dumps(fix(payload), sort_keys=True, separators=(",", ":"), allow_nan=False)


def loads_payload(row: Row) -> dict[str, Any]:
    try:
        out = json.loads(row.payload)
    except json.JSONDecodeError as e:
        raise LedgerIntegrityError(f"row seq {row.seq}: payload is not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise LedgerIntegrityError(f"row seq {row.seq}: payload is not a JSON object")
    return out
