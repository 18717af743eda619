"""Where a model lives: a local directory or a Hub repo (optionally at a revision)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalDir:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


Location = LocalDir | HubRepo


def parse_location(value: str | Path, *, allow_revision: bool = True) -> Location:
    """A `Path`, or a string starting with `/`, `.` or `~`, is local; any other string is a repo id.

    A repo id may carry `@revision` (source only), as in `org/model@v1.0`. A would-be repo id that
    also names a local file or directory is refused rather than guessed at: read from the Hub, it
    fails only after a network round trip; written to the Hub, it creates a repo the user did not mean.
    """
    if isinstance(value, Path):
        return LocalDir(value.expanduser())
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a Hub repo id or a local path, got {value!r}")
    if value.startswith(("/", ".", "~")):
        return LocalDir(Path(value).expanduser())
    repo_id, sep, revision = value.partition("@")
    if sep and not allow_revision:
        raise ValueError(f"{value!r}: an output repo takes no @revision (use branch= to publish to a branch)")
    if sep and not revision:
        raise ValueError(f"{value!r}: empty revision after '@'")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"{value!r} is not a Hub repo id ('org/name') nor a local path (start it with ./ or /)")
    if Path(value).exists():
        raise ValueError(
            f"{value!r} could be a Hub repo id or the local path {value}, which exists: write ./{value} for the "
            "local one, or use another directory name"
        )
    return HubRepo(repo_id, revision or None)


def source_location(src: str | Path, revision: str | None) -> Location:
    """The source, with `revision=` folded into `id@revision` (refusing two different ones)."""
    location = parse_location(src)
    if isinstance(location, HubRepo) and revision is not None:
        if location.revision not in (None, revision):
            raise ValueError(f"two revisions given for {location.repo_id}: @{location.revision} and revision={revision!r}")
        location = HubRepo(location.repo_id, revision)
    return location
