"""The error answers of the Hub, as an exception any layer of the emulator can raise."""

from __future__ import annotations


class HubError(Exception):
    """An error the Hub answers with: the client maps `code` (sent as `X-Error-Code`) to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def repo_not_found(repo_id: str, status: int = 404) -> HubError:
    """Missing and hidden (private) repos answer alike, so a caller cannot probe what exists."""
    return HubError(status, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, commit_id: str | None = None) -> HubError:
    """Carries `X-Repo-Commit` like the Hub, which lets the client cache the file's absence at that commit."""
    headers = {"X-Repo-Commit": commit_id} if commit_id else {}
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
