"""Secrets: values an owner stores once and names at create (docs/secrets.md).

A secret belongs to one owner and is named like an environment variable; a sandbox created
with ``spec.secrets = ["OPENAI_API_KEY"]`` gets the owner's value of that name in the
environment of its main process and of every command. Nothing returns a value to a client:
`CreateSecret` takes one, `ListSecrets` gives names and times, `DeleteSecret` forgets it.

At rest, in the registry's `secrets` table (migration 8 of server/registry.py), a value is
AES-256-GCM ciphertext (the `cryptography` package's AEAD) under a key kept apart from the
registry, in `<state>/secrets.key` (32 random bytes, 0600, made at the first need), with the
owner and the name as associated data: a row copied to another owner or name does not
decrypt. A copy of the registry alone (a backup, a file shared for debugging) reveals names
and times, never values. The key file is the secret of the whole store: whoever reads it and
the registry reads every value; both are private to the service's user (aviato/_private.py).

In clear, a value exists only in the service's memory between create and start (the
`SandboxConfig.secret_env` of a sandbox on its way to a runtime, never recorded), in the
descriptor that hands it to bubblewrap (never on a command line: see
runtime/bubblewrap/command.py `environment_args`) and in the sandbox's processes' environment.

What it cannot do: take a value back from a running sandbox. Deleting or replacing a secret
changes what sandboxes created afterwards get; the ones running keep the value they started
with (their processes have it), until they end.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aviato._private import FILE_MODE
from aviato.runtime.model import SandboxConfig
from aviato.server.errors import (
    AlreadyExists,
    CapacityExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

__all__ = [
    "KEY_FILE",
    "MAX_SANDBOX_SECRETS",
    "MAX_SECRETS_PER_OWNER",
    "MAX_VALUE_BYTES",
    "SECRETS_MIGRATION",
    "SecretInfo",
    "SecretStore",
    "validate_secret_name",
    "validate_secret_names",
]

KEY_FILE = "secrets.key"
MAX_NAME_CHARS = 128
MAX_VALUE_BYTES = 64 * 1024
MAX_SECRETS_PER_OWNER = 256
MAX_SANDBOX_SECRETS = 64
# The values of one sandbox's secrets together: they travel in the supervisor's environment,
# which the kernel bounds with the arguments (ARG_MAX, 2 MiB by default on Linux).
MAX_SANDBOX_SECRET_BYTES = 512 * 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NONCE_BYTES = 12
_KEY_BYTES = 32

SECRETS_MIGRATION = """
    CREATE TABLE secrets (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        sealed BLOB NOT NULL,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        PRIMARY KEY (owner, name)
    );
"""


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What anyone may learn of a secret: its name and times, never its value."""

    name: str
    created_ns: int
    updated_ns: int


def validate_secret_name(name: str, field: str) -> str:
    if not name:
        raise InvalidArgument(field, "a secret needs a name")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        # Never repeated: a value sent where a name goes must not reach an error or a log.
        raise InvalidArgument(
            field,
            "that is not a secret name (not shown, in case it is a value): a secret is named "
            f"like an environment variable (a letter or '_', then letters, digits and '_'; at "
            f"most {MAX_NAME_CHARS})",
        )
    return name


def validate_secret_names(names: list[str], env: dict[str, str], field: str) -> tuple[str, ...]:
    """The names a create asks for: valid, distinct, not also set in `env`."""
    if len(names) > MAX_SANDBOX_SECRETS:
        raise InvalidArgument(field, f"more than {MAX_SANDBOX_SECRETS} secrets")
    seen: list[str] = []
    for name in names:
        validate_secret_name(name, field)
        if name in env:
            raise InvalidArgument(
                field,
                f"{name} is both an environment variable and a secret of this sandbox: "
                "give it one way",
            )
        if name not in seen:
            seen.append(name)
    return tuple(seen)


def _validate_value(value: str, field: str) -> bytes:
    data = value.encode()
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidArgument(field, f"a secret's value is at most {MAX_VALUE_BYTES} bytes")
    if "\x00" in value:
        raise InvalidArgument(field, "a secret's value cannot contain a NUL character")
    return data


class SecretStore:
    """The owners' secrets in the registry's `secrets` table, sealed with the key of
    `key_path`. Used from the service's event-loop thread (one SQLite connection)."""

    def __init__(self, db: sqlite3.Connection, key_path: Path) -> None:
        self._db = db
        self._key_path = key_path
        self._aead: AESGCM | None = None

    # -- the key ----------------------------------------------------------------------------

    def _cipher(self) -> AESGCM:
        """The AEAD of the key file, which is made (0600, never replaced) at the first need."""
        if self._aead is None:
            self._aead = AESGCM(self._load_or_make_key())
        return self._aead

    def _load_or_make_key(self) -> bytes:
        """The key file's key; made whole or not at all: written and synced under a temporary
        name, then linked into place (a service killed meanwhile leaves no partial key, and
        of two services making one at once the second reads the first's)."""
        if os.path.lexists(self._key_path):
            return self._read_key()
        key = AESGCM.generate_key(bit_length=8 * _KEY_BYTES)
        tmp = self._key_path.with_name(f".{self._key_path.name}.{os.getpid()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process of this pid that was killed
        fd = os.open(tmp, flags, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self._key_path)  # never replaces: an existing key wins
        except FileExistsError:
            return self._read_key()
        finally:
            tmp.unlink()
        return key

    def _read_key(self) -> bytes:
        """The key, from a regular file of exactly 32 bytes (never through a symlink)."""
        try:
            fd = os.open(self._key_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            key = b""
        else:
            try:
                key = os.read(fd, _KEY_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
            finally:
                os.close(fd)
        if len(key) != _KEY_BYTES:
            # The operator's to repair: never a new key, which would lose every value.
            raise FailedPrecondition(
                f"the service's secrets key ({self._key_path.name} in its state directory) is "
                "damaged; ask the operator"
            )
        return key

    @staticmethod
    def _aad(owner: str, name: str) -> bytes:
        return owner.encode() + b"\x00" + name.encode()

    def _seal(self, owner: str, name: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._cipher().encrypt(nonce, data, self._aad(owner, name))

    def _open(self, owner: str, name: str, sealed: bytes) -> str:
        try:
            data = self._cipher().decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], self._aad(owner, name)
            )
        except InvalidTag:
            raise FailedPrecondition(
                f"your secret {name} cannot be read with the service's secrets key (the key "
                "or the registry was replaced); create it again"
            ) from None
        return data.decode()

    # -- the calls --------------------------------------------------------------------------

    def create(self, owner: str, name: str, value: str, *, replace_value: bool) -> SecretInfo:
        validate_secret_name(name, "name")
        data = _validate_value(value, "value")
        now = time.time_ns()
        sealed = self._seal(owner, name, data)
        existing = self._row(owner, name)
        if existing is not None:
            if not replace_value:
                raise AlreadyExists(
                    f"you have a secret named {name} already; delete it first or replace its "
                    "value (replace=True, `aviato secret create --replace`)"
                )
            self._db.execute(
                "UPDATE secrets SET sealed=?, updated_ns=? WHERE owner=? AND name=?",
                (sealed, now, owner, name),
            )
            return SecretInfo(name, existing[1], now)
        count = self._db.execute("SELECT COUNT(*) FROM secrets WHERE owner=?", (owner,)).fetchone()
        if int(count[0]) >= MAX_SECRETS_PER_OWNER:
            raise CapacityExceeded(
                f"you have {MAX_SECRETS_PER_OWNER} secrets, the most the service keeps per "
                "owner; delete some first"
            )
        self._db.execute(
            "INSERT INTO secrets (owner, name, sealed, created_ns, updated_ns) VALUES (?,?,?,?,?)",
            (owner, name, sealed, now, now),
        )
        return SecretInfo(name, now, now)

    def list(self, owner: str) -> list[SecretInfo]:
        rows = self._db.execute(
            "SELECT name, created_ns, updated_ns FROM secrets WHERE owner=? ORDER BY name",
            (owner,),
        ).fetchall()
        return [SecretInfo(str(n), int(c), int(u)) for n, c, u in rows]

    def delete(self, owner: str, name: str) -> None:
        validate_secret_name(name, "name")
        cursor = self._db.execute("DELETE FROM secrets WHERE owner=? AND name=?", (owner, name))
        if cursor.rowcount == 0:
            raise NotFound(f"you have no secret named {name}")

    def _row(self, owner: str, name: str) -> tuple[bytes, int] | None:
        row = self._db.execute(
            "SELECT sealed, created_ns FROM secrets WHERE owner=? AND name=?", (owner, name)
        ).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))

    def resolve(self, owner: str, config: SandboxConfig) -> SandboxConfig:
        """`config` with the values of its secrets (`secret_env`), read now; an unknown name
        is refused in words (another owner's secret of that name is never seen)."""
        if not config.secrets:
            return config
        values: dict[str, str] = {}
        total = 0
        for name in config.secrets:
            row = self._row(owner, name)
            if row is None:
                raise InvalidArgument(
                    "spec.secrets",
                    f"you have no secret named {name}; create it first (`aviato secret create "
                    f"{name}`, or Secret.create)",
                )
            values[name] = self._open(owner, name, row[0])
            total += len(name) + len(values[name].encode()) + 2
        if total > MAX_SANDBOX_SECRET_BYTES:
            raise InvalidArgument(
                "spec.secrets",
                f"the values of these secrets take more than {MAX_SANDBOX_SECRET_BYTES // 1024} "
                "KiB together, more than one sandbox can take",
            )
        return replace(config, secret_env=values)
