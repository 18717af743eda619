"""Bounded retries with backoff for the Hub calls huggingface_hub does not retry itself.

huggingface_hub retries its own transfers (LFS uploads, preupload, resolve), but not `model_info`,
`create_repo`, commits, header reads, or a download stream that breaks. streamq wraps those calls
here: the same schedule as `huggingface_hub.utils.http_backoff` (1, 2, 4, 8 s, honouring Retry-After),
then the error goes up with the state on the Hub intact, for the next run to resume from. A
connection given up because it trickles (`stall.TransferStalled`, a timeout of huggingface_hub's httpx)
counts as a network error, and a download that moved forward before it starts the count again.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
ATTEMPTS = 5
BASE_DELAY = 1.0
MAX_DELAY = 8.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures, from whichever httpx the installed huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


def transient_delay(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying `exc`, or None when it is not worth retrying."""
    if isinstance(exc, OfflineModeIsEnabled):  # a setting, not a fault: every retry would be refused too
        return None
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        if response is None or response.status_code not in TRANSIENT_STATUS:
            return None
        retry_after = response.headers.get("Retry-After")
        if retry_after and retry_after.isdigit():
            return float(retry_after)
    elif not isinstance(exc, TRANSPORT_ERRORS):
        return None
    return min(BASE_DELAY * 2**attempt, MAX_DELAY)


def retrying(
    call: Callable[[], T], what: str, attempts: int = ATTEMPTS, sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[], int] | None = None,
) -> T:
    """Run `call`, retrying transient failures up to `attempts` times in a row.

    `progress` (say, the bytes a download has written) starts the count again after a failure that
    came after progress, as huggingface_hub does for a download stream: a long transfer over a flaky
    network goes on while it moves forward, and stops after `attempts` failures that move nothing.
    """
    attempt, mark = 0, progress() if progress else 0
    while True:
        try:
            return call()
        except Exception as exc:
            delay = transient_delay(exc, attempt)
            if progress is not None and (now := progress()) > mark:
                attempt, mark = 0, now
                delay = transient_delay(exc, 0)
            if delay is None or attempt == attempts - 1:
                raise
            logger.warning("%s failed (%s); retrying in %.0f s (%d/%d)", what, _describe(exc), delay, attempt + 1, attempts - 1)
            sleep(delay)
            attempt += 1


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
