"""The absolute URLs the hub hands out, and the signatures that make storage URLs work without a token."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .storage import Repo


@dataclass(frozen=True)
class Urls:
    """`api` is the Hub origin; `storage` another origin on the same server, standing in for the Hub's CDN.

    The client stops following redirects at a different origin during HEAD and drops the Authorization header
    there, so storage URLs carry an HMAC of what they grant instead, like signed CDN URLs.
    """

    api: str
    storage: str
    secret: bytes

    def repo(self, repo: Repo) -> str:
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return f"{self.api}/{prefix}{repo.id}"

    def sign(self, *parts: str) -> str:
        return hmac.new(self.secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()[:32]

    def storage_url(self, verb: str, repo: Repo, oid: str, *rest: str) -> str:
        """A URL allowing `verb` on object `oid` of `repo` (and on `rest`: its size, a part number)."""
        signature = self.sign(verb, repo.type, repo.id, oid, *rest)
        return "/".join([f"{self.storage}/storage/{signature}/{repo.type}/{repo.id}/{oid}", *rest])
