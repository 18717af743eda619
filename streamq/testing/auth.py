"""Who may read and write which repo, answered with the status codes and error codes of the real Hub."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import HubError, repo_not_found

DEFAULT_USER = "user"  # author of commits and namespace of `create_repo("name")` when no token names a user
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the client special-cases this exact message


@dataclass(frozen=True)
class Caller:
    """The identity behind a request. `user` is None when no token was sent; `unrestricted` when auth is off."""

    user: str | None
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    gated: tuple[str, ...] = ()
    unrestricted: bool = False

    @property
    def name(self) -> str:
        return self.user or DEFAULT_USER

    def can_read(self, repo_id: str) -> bool:
        return self.unrestricted or self.can_write(repo_id) or _matches(self.read, repo_id)

    def can_write(self, repo_id: str) -> bool:
        return self.unrestricted or _matches(self.write, repo_id)

    def accepted_terms(self, repo_id: str) -> bool:
        return self.unrestricted or self.can_write(repo_id) or _matches(self.gated, repo_id)


def _matches(patterns: Sequence[str], repo_id: str) -> bool:
    return any(fnmatchcase(repo_id, pattern) for pattern in patterns)


class Access:
    """Token grants: `{token: {"read": [patterns], "write": [patterns], "gated": [patterns], "user": name}}`.

    Patterns are fnmatch patterns on repo ids. Public repos are readable by anyone; `read` matters for private ones,
    `gated` lists the gated repos whose terms the token's user accepted; `write` implies the other two. Without a
    grant table (the default) every request, with or without a token, may do everything, and private/gated flags
    are only reported in repo info.
    """

    def __init__(self, tokens: Mapping[str, Mapping[str, object]] | None) -> None:
        self.enabled = tokens is not None
        self._callers = {token: _caller(grant) for token, grant in (tokens or {}).items()}

    def identify(self, token: str | None) -> Caller:
        if not self.enabled:
            return Caller(user=DEFAULT_USER if token else None, unrestricted=True)
        if token is None:
            return Caller(user=None)
        caller = self._callers.get(token)
        if caller is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return caller


def _caller(grant: Mapping[str, object]) -> Caller:
    def patterns(key: str) -> tuple[str, ...]:
        value = grant.get(key, ())
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"token grant {key!r} must be a list of repo id patterns")
        return tuple(str(pattern) for pattern in value)

    # Never derive a name or a message from the token itself: it would end up in logs and commit authors.
    user = str(grant.get("user") or DEFAULT_USER)
    return Caller(user=user, read=patterns("read"), write=patterns("write"), gated=patterns("gated"))


def check_read(caller: Caller, repo_id: str, private: bool) -> None:
    """Private repos a caller cannot read do not exist for them: 401 when anonymous, 404 otherwise, as on the Hub."""
    if private and not caller.can_read(repo_id):
        raise repo_not_found(repo_id, status=401 if caller.user is None else 404)


def check_download(caller: Caller, repo_id: str, private: bool, gated: bool) -> None:
    """Gated repos show their info to all, but their files only to users who accepted the terms."""
    check_read(caller, repo_id, private)
    if gated and not caller.accepted_terms(repo_id):
        status = 401 if caller.user is None else 403
        message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
        raise HubError(status, message, "GatedRepo")


def check_write(caller: Caller, repo_id: str, private: bool = False) -> None:
    check_read(caller, repo_id, private)
    if caller.can_write(repo_id):
        return
    if caller.user is None:
        raise HubError(401, f"You must be authenticated to write to {repo_id}")
    raise HubError(403, f"You don't have the rights to write to {repo_id}: the token is read-only for it")


def check_contribute(caller: Caller, repo_id: str, private: bool) -> None:
    """Opening or updating a pull request needs a signed-in user who can read the repo, not write access."""
    check_read(caller, repo_id, private)
    if caller.user is None and not caller.unrestricted:
        raise HubError(401, f"You must be authenticated to open a pull request on {repo_id}")
