"""The few things streamq needs around `huggingface_hub`: a client, and errors a user can act on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .retry import TRANSPORT_ERRORS
from .errors import AccessDeniedError, OutputNotWritableError, SourceNotFoundError, StreamqError
from .surface import remedy


def make_api(token: str | bool | None, endpoint: str | None) -> HfApi:
    """One client for the whole run; `token`/`endpoint` default the way huggingface_hub resolves them."""
    return HfApi(endpoint=endpoint, token=token, library_name="streamq")


def require_online(repo: str) -> None:
    """Fail at once under HF_HUB_OFFLINE: huggingface_hub refuses every request then, which would
    otherwise look like a network fault, be retried with backoff and end in "run again"."""
    if constants.is_offline_mode():
        raise StreamqError(_offline(repo))


def _offline(repo: str) -> str:
    return f"offline mode is on (HF_HUB_OFFLINE=1), so {repo} on the Hub cannot be reached; unset HF_HUB_OFFLINE, or use local directories"


@contextmanager
def reading(repo: str) -> Iterator[None]:
    """Turn the client's read errors into messages that say what to check."""
    try:
        yield
    except GatedRepoError as exc:
        raise AccessDeniedError(
            f"{repo} is gated: accept its terms on the Hub with the account of your token, then run again"
        ) from exc
    except RevisionNotFoundError as exc:
        raise SourceNotFoundError(f"{repo}: revision not found; check the branch, tag or commit after '@'") from exc
    except EntryNotFoundError:
        raise
    except RepositoryNotFoundError as exc:
        raise SourceNotFoundError(
            f"repo {repo} not found, or private and your token cannot see it; check the name, or "
            f"{remedy('log_in')} with an account that can read it"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AccessDeniedError(f"no read access to {repo} (HTTP {status}); use a token that can read it") from exc
        raise StreamqError(f"reading {repo} failed: {_short(exc)}; run again to resume") from exc
    except OfflineModeIsEnabled as exc:
        raise StreamqError(_offline(repo)) from exc
    except TRANSPORT_ERRORS as exc:
        raise StreamqError(f"network error reading {repo} ({_short(exc)}); run again to resume") from exc


@contextmanager
def writing(repo: str) -> Iterator[None]:
    """Turn the client's write errors into messages that say what to check."""
    try:
        yield
    except HfHubHTTPError as exc:
        raise _write_refused(repo, exc) from exc
    except RuntimeError as exc:  # huggingface_hub wraps a failed LFS upload: "Error while uploading ..."
        if not isinstance(exc.__cause__, HfHubHTTPError):
            raise
        raise _write_refused(repo, exc.__cause__) from exc
    except OfflineModeIsEnabled as exc:
        raise StreamqError(_offline(repo)) from exc
    except TRANSPORT_ERRORS as exc:
        raise StreamqError(f"network error publishing to {repo} ({_short(exc)}); run again to resume") from exc


def _write_refused(repo: str, exc: HfHubHTTPError) -> StreamqError:
    status = exc.response.status_code if exc.response is not None else None
    if status in (401, 403):
        return OutputNotWritableError(f"cannot write to {repo} (HTTP {status}): {remedy('log_in')} with an account that can write to it")
    return StreamqError(f"publishing to {repo} failed: {_short(exc)}; run again to resume")


def _short(exc: Exception) -> str:
    """First line of a client error, which holds the status and the server's message but no token."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
