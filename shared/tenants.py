"""Tenants: who may call ingress, with which apps, within which limits. Pure: loading and looking
up, no Redis and no HTTP.

A tenants file (`MAGNUS_TENANTS_FILE`, TOML) lists each tenant with the SHA-256 of its API keys
(never the keys: `python -m offline.cli new-key` prints a new key and its hash):

    [[tenant]]
    name = "acme"
    key_sha256 = ["5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
    apps = ["qa", "translate"]      # "*": any app
    max_open_requests = 200         # accepted and not final, at once (429 beyond)
    tokens_per_minute = 200000      # prompt + max_tokens accepted per minute (429 beyond)
    weight = 1.0                    # its share of the GPUs when tenants compete
    admin = false                   # may send benchmark-only fields and read every request

Without a file there is one implicit tenant, `default`, with no key, every app, no limits beyond
the global ones, and admin rights: acceptable only on loopback, which ingress enforces.
"""

from __future__ import annotations

import hashlib
import secrets
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TENANT = "default"
_HEX64 = r"^[0-9a-f]{64}$"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return f"mk-{secrets.token_urlsafe(32)}"


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    key_sha256: list[str] = Field(default_factory=list)
    apps: list[str] = Field(default_factory=lambda: ["*"])
    max_open_requests: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    weight: float = Field(default=1.0, gt=0)
    admin: bool = False

    @model_validator(mode="after")
    def _keys_are_hashes(self) -> Tenant:
        import re

        for k in self.key_sha256:
            if not re.fullmatch(_HEX64, k):
                raise ValueError(f"tenant {self.name}: key_sha256 entries are 64 lowercase hex "
                                 "digits (the SHA-256 of a key, never the key)")
        return self

    def may_use(self, app_id: str) -> bool:
        return "*" in self.apps or app_id in self.apps


class TenantDirectory(BaseModel):
    """Every tenant, and which key hash belongs to whom."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tenant: list[Tenant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> TenantDirectory:
        names = [t.name for t in self.tenant]
        if len(names) != len(set(names)):
            raise ValueError("tenant names must be unique")
        hashes = [k for t in self.tenant for k in t.key_sha256]
        if len(hashes) != len(set(hashes)):
            raise ValueError("a key hash belongs to two tenants")
        return self

    @property
    def keyed(self) -> bool:
        """Whether callers must present a key (a tenants file was given)."""
        return bool(self.tenant)

    def by_key(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        for t in self.tenant:
            # compare_digest: the time taken does not tell how much of a hash matched.
            if any(secrets.compare_digest(digest, k) for k in t.key_sha256):
                return t
        return None

    def by_name(self, name: str) -> Tenant | None:
        return next((t for t in self.tenant if t.name == name), None)


# The tenant every request belongs to when no tenants file is configured.
OPEN_TENANT = Tenant(name=DEFAULT_TENANT, admin=True)


def load_tenants(path: Path | None) -> TenantDirectory:
    """The directory in `path` (TOML), or an empty one (no keys) when None; `ValueError` with the
    reason for a file that does not parse or validate."""
    if path is None:
        return TenantDirectory()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"tenants file {path}: {exc}") from exc
    return TenantDirectory.model_validate(raw)
