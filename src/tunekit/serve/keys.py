"""API keys kept in the server's database: made, listed and revoked by `tunekit keys`, checked by the app's
guard on every request, so a new or revoked key counts at once, without a restart.

    tk-{12 letters and digits: the key's id}-{43 characters: 256 random bits, URL-safe base64}

Only a salted hash of the secret part is stored (PBKDF2-SHA256, a fresh 16-byte salt per key), with the key's
last four characters to tell keys apart in `tunekit keys list`. A request's key is found by the id it carries
(one indexed row), then its hash compared in constant time. Once a key is seen to be right, this process keeps
a SHA-256 of it in memory so later requests skip the key derivation; the row (is it revoked?) is read every time.

Keys given to `tunekit serve` (`--api-key`, `--api-keys-file`, `TUNEKIT_API_KEYS`) keep working beside these.
Once the database holds a key (revoked ones too), every `/v1` request needs a key, as with `--api-key`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from tunekit.errors import Problem, TunekitError
from tunekit.serve.store import Store, new_id, now

PREFIX = "tk-"
ID_CHARS = 12  # the id part of a key (`key_` + these is the key's id in listings and `tunekit keys revoke`)
# The secret is 256 random bits, so stretching adds nothing against guessing it; the hash only keeps the
# database from holding usable keys. A small cost, paid once per key per server process (then cached).
ITERATIONS = 20_000
PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no ':': a project is a field of `ft:` model names


@dataclass(frozen=True)
class KeyCheck:
    """What the database says about a request's bearer token."""

    required: bool  # the database holds keys: a /v1 request needs a valid one
    project: str | None = None  # the project of a valid, unrevoked key
    revoked: str | None = None  # the id of the key the token is, when that key was revoked


def _digest(secret: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, ITERATIONS)


def _split(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a token in this module's format, else None."""
    if not token.startswith(PREFIX) or len(token) <= len(PREFIX) + ID_CHARS + 1 \
            or token[len(PREFIX) + ID_CHARS] != "-":
        return None
    return "key_" + token[len(PREFIX):len(PREFIX) + ID_CHARS], token[len(PREFIX) + ID_CHARS + 1:]


def create_key(store: Store, project: str) -> tuple[dict, str]:
    """(its row, without the hash; the key itself, which is not kept anywhere): a new key of `project`."""
    if not PROJECT.fullmatch(project):
        raise TunekitError(Problem("--project", f"{project!r} is not a project name",
                                   "give 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"))
    key_id = new_id("key_", ID_CHARS)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    row = {"id": key_id, "project": project, "created_at": now(), "salt": salt.hex(),
           "hash": _digest(secret, salt).hex(), "last4": secret[-4:], "revoked_at": None}
    store.add_key(row)
    return {k: v for k, v in row.items() if k not in ("salt", "hash")}, f"{PREFIX}{key_id[4:]}-{secret}"


def list_keys(store: Store) -> list[dict]:
    """Every key, oldest first: id, project, created_at, last4, revoked_at (None while it works)."""
    return [{k: row[k] for k in ("id", "project", "created_at", "last4", "revoked_at")} for row in store.keys()]


def revoke_key(store: Store, key_id: str) -> dict:
    """Revoke a key: requests with it get a 401 from now on. Revoking a revoked key changes nothing."""
    row = store.key(key_id)
    if row is None:
        known = ", ".join(k["id"] for k in store.keys()) or "none"
        raise TunekitError(Problem("ID", f"no key {key_id!r} in {store.dir / 'tunekit.db'} (keys: {known})",
                                   "give an id `tunekit keys list` shows (key_...)"))
    store.revoke_key(key_id)
    return {k: v for k, v in store.key(key_id).items() if k not in ("salt", "hash", "seq")}


class StoredKeys:
    """The guard's view of the database's keys (one per app; `check` runs on the request threads)."""

    def __init__(self, store: Store):
        self.store = store
        self._any = False  # keys are never deleted: once there are some, there always are
        self._seen: dict[str, bytes] = {}  # key id -> SHA-256 of the token last verified for it

    def check(self, token: str) -> KeyCheck:
        if not self._any:
            self._any = self.store.has_keys()
            if not self._any:
                return KeyCheck(required=False)
        parts = _split(token)
        row = self.store.key(parts[0]) if parts else None
        if row is None:
            return KeyCheck(required=True)
        if row["revoked_at"] is not None:
            return KeyCheck(required=True, revoked=row["id"])
        quick = hashlib.sha256(token.encode()).digest()
        seen = self._seen.get(row["id"])
        if seen is not None and hmac.compare_digest(seen, quick):
            return KeyCheck(required=True, project=row["project"])
        if not hmac.compare_digest(_digest(parts[1], bytes.fromhex(row["salt"])), bytes.fromhex(row["hash"])):
            return KeyCheck(required=True)
        self._seen[row["id"]] = quick
        return KeyCheck(required=True, project=row["project"])
