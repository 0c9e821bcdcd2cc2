"""Who is calling: API tokens name principals, and a principal's role and roots decide what it may do and see.

A token is configured as ``name:token`` (``team-a:s3cr3t``); a token with no name belongs to the principal
``default``, as every token did before names existed. Roles: ``read`` may read, ``write`` may also create,
cancel and retry generations, ``admin`` may do all of it for every principal. A principal sees its own
generations and datasets; ``default`` and admins see every one. Another principal's generation is a 404,
never a 403: its existence is not disclosed.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from service.settings import Settings

DEFAULT = "default"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Role(enum.IntEnum):
    """Ordered: each role may do what the ones below it may."""

    READ = 1
    WRITE = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    roots: tuple[str, ...] = ()  # source roots of its own, on top of the global ones

    @property
    def sees_all(self) -> bool:
        return self.role == Role.ADMIN or self.name == DEFAULT

    def may_see(self, owner: str | None) -> bool:
        return self.sees_all or owner == self.name


def parse_token(entry: str) -> tuple[str, str]:
    """``name:token`` -> (name, token); a bare token is the ``default`` principal's."""
    name, sep, token = entry.partition(":")
    if not sep:
        return DEFAULT, entry
    if not NAME.match(name) or not token:
        raise ValueError(f"a token is `name:token` with a name of lowercase letters, digits, '_', '.', '-': {name!r}")
    return name, token


@dataclass
class Principals:
    """The configured tokens; looks one up in constant time whatever it holds."""

    tokens: dict[str, Principal] = field(default_factory=dict)

    def add(self, entry: str, role: Role, roots: dict[str, list[str]] | None = None) -> None:
        name, token = parse_token(entry)
        known = self.tokens.get(token)
        if known is not None and known.name != name:
            raise ValueError(f"one token is given to two principals: {known.name} and {name}")
        if known is None or known.role < role:
            self.tokens[token] = Principal(name, role, tuple((roots or {}).get(name, ())))

    def find(self, token: str) -> Principal | None:
        found = None
        for known, principal in self.tokens.items():  # no early exit: the time taken says nothing of the token
            if secrets.compare_digest(token.encode(), known.encode()):
                found = principal
        return found

    def __bool__(self) -> bool:
        return bool(self.tokens)


def api_principals(settings: Settings) -> tuple[Principals, Path | None]:
    """The configured principals; in development with no token configured, one write token of ``default``
    kept in the data dir (0600 in a 0700 folder)."""
    principals = Principals()
    for entries, role in (
        (settings.read_tokens, Role.READ),
        (settings.write_tokens, Role.WRITE),
        (settings.admin_tokens, Role.ADMIN),
    ):
        for entry in entries:
            principals.add(entry.get_secret_value(), role, settings.principal_roots)
    if principals:
        return principals, None
    path = settings.data_dir.resolve() / "api-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.chmod(0o700)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    principals.add(path.read_text().strip(), Role.WRITE)
    return principals, path
