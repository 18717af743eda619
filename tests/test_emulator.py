"""The loopback Hub emulator, driven by the real huggingface_hub client over HTTP (no mocks)."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # read at import: the emulator speaks git-LFS, not Xet
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import httpx2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    BadRequestError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status  # noqa: E402
from safetensors.numpy import save  # noqa: E402

from streamq.testing import Fault, FaultSet, LocalHub  # noqa: E402

REPO = "me/model"
TOKENS = {
    "hf_write": {"read": ["*"], "write": ["me/*"], "user": "me"},
    "hf_read": {"read": ["*"], "write": [], "gated": ["me/gated"], "user": "reader"},
    "hf_other": {"read": [], "write": [], "user": "other"},
}


@pytest.fixture(autouse=True)
def _hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub read HF_HOME at import: point the paths it derived into tmp, and forget any login."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def local_hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture
def api(local_hub: LocalHub) -> HfApi:
    return HfApi(endpoint=local_hub.endpoint, token="hf_anything")


def _weights(seed: int = 0, n: int = 20_000) -> bytes:
    """A real safetensors file, a few dozen KB."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n // 100, 100), dtype=np.float32)
    return save({"a.weight": weight, "b.bias": np.arange(7, dtype=np.int64)})


def _model_repo(api: HfApi, weights: bytes) -> str:
    api.create_repo(REPO)
    ops = [
        CommitOperationAdd("config.json", b'{"model_type": "llama"}'),
        CommitOperationAdd("model.safetensors", weights),
        CommitOperationAdd("nested/dir/notes.txt", b"hello"),
    ]
    return api.create_commit(REPO, ops, commit_message="add model").oid


def _download(hub: LocalHub, filename: str, tmp_path: Path, **kwargs: Any) -> bytes:
    path = hf_hub_download(REPO, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)
    return Path(path).read_bytes()


# -- repos, commits, downloads ------------------------------------------------------------------------------------
def test_create_repo_conflict_and_exist_ok(api: HfApi) -> None:
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(api.endpoint)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.repo_exists(REPO) and not api.repo_exists("me/other")
    assert api.list_repo_files(REPO) == [".gitattributes"]  # the Hub's initial commit
    assert [c.title for c in api.list_repo_commits(REPO)] == ["initial commit"]


def test_commit_regular_and_lfs_files_then_download(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    sha = _model_repo(api, weights)
    files = [".gitattributes", "config.json", "model.safetensors", "nested/dir/notes.txt"]
    assert sorted(api.list_repo_files(REPO)) == files
    assert local_hub.requests.count("PUT", r"^/storage/") == 1  # only the .safetensors went through LFS

    assert _download(local_hub, "model.safetensors", tmp_path) == weights
    assert _download(local_hub, "config.json", tmp_path) == b'{"model_type": "llama"}'
    local = hf_hub_download(REPO, "nested/dir/notes.txt", endpoint=local_hub.endpoint, local_dir=tmp_path / "out")
    assert Path(local) == tmp_path / "out" / "nested" / "dir" / "notes.txt" and Path(local).read_bytes() == b"hello"

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["model.safetensors"].lfs is not None and siblings["model.safetensors"].lfs.size == len(weights)
    assert siblings["config.json"].lfs is None
    assert api.model_info(REPO).siblings[0].size is None  # type: ignore[index]  # sizes only with files_metadata
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert "nested/dir" in tree and tree["model.safetensors"].lfs.size == len(weights)  # type: ignore[union-attr]
    assert [f.path for f in api.list_repo_tree(REPO, path_in_repo="nested")] == ["nested/dir"]
    [paths] = api.get_paths_info(REPO, ["config.json", "missing.txt"])
    assert paths.path == "config.json"


def test_downloaded_file_is_not_fetched_again(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    _model_repo(api, weights)
    first = snapshot_download(REPO, endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache")
    local_hub.requests.clear()
    again = snapshot_download(REPO, endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache")
    assert again == first and (Path(again) / "model.safetensors").read_bytes() == weights
    assert local_hub.requests.count("GET", r"^/storage/|/resolve/") == 0


def test_range_requests_and_safetensors_header(api: HfApi, local_hub: LocalHub) -> None:
    weights = _weights()
    _model_repo(api, weights)
    meta = api.parse_safetensors_file_metadata(REPO, "model.safetensors")
    assert meta.tensors["a.weight"].shape == [200, 100] and meta.tensors["b.bias"].dtype == "I64"
    repo_meta = api.get_safetensors_metadata(REPO)
    assert repo_meta.files_metadata["model.safetensors"].parameter_count == {"F32": 20_000, "I64": 7}

    url = f"{local_hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    head = get_session().head(url, follow_redirects=False)
    assert head.status_code == 302 and head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["Location"].startswith(local_hub.storage_endpoint)  # another origin, like the CDN
    part = get_session().get(url, headers={"Range": "bytes=8-15", "Accept-Encoding": "gzip"})
    assert part.status_code == 206 and part.content == weights[8:16] and "Content-Encoding" not in part.headers
    assert part.headers["Content-Range"] == f"bytes 8-15/{len(weights)}" and part.headers["Accept-Ranges"] == "bytes"
    assert get_session().get(url, headers={"Range": f"bytes={len(weights)}-"}).status_code == 416
    assert local_hub.requests.count("GET", r"^/storage/", status=206) >= 2  # header reads and the range above

    regular = get_session().head(f"{local_hub.endpoint}/{REPO}/resolve/main/config.json")
    assert regular.status_code == 200 and regular.headers["Content-Length"] == "23"
    assert len(regular.headers["X-Repo-Commit"]) == 40


def test_keep_alive_connection_serves_many_requests(api: HfApi, local_hub: LocalHub) -> None:
    """Each answer must carry an exact Content-Length, or the next one on the connection would be garbled."""
    _model_repo(api, _weights())
    conn = http.client.HTTPConnection(local_hub.endpoint.removeprefix("http://"))
    try:
        for method, path, status in [
            ("HEAD", f"/{REPO}/resolve/main/config.json", 200),
            ("GET", f"/{REPO}/resolve/main/config.json", 200),
            ("GET", f"/{REPO}/resolve/main/missing", 404),
            ("POST", "/api/validate-yaml", 200),
            ("GET", f"/api/models/{REPO}", 200),
        ]:
            # The POST body goes chunked, as httpx sends streamed uploads of unknown length.
            body_parts = iter([b'{"content": ', b'"---"}']) if method == "POST" else None
            conn.request(method, path, body=body_parts, encode_chunked=method == "POST")
            response = conn.getresponse()
            body = response.read()
            assert response.status == status
            assert len(body) == (0 if method == "HEAD" else int(response.headers["Content-Length"]))
            assert not response.will_close
    finally:
        conn.close()


def test_concurrent_commits_are_all_kept(api: HfApi) -> None:
    api.create_repo(REPO)
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: api.upload_file(path_or_fileobj=b"x", path_in_repo=f"{i}.txt", repo_id=REPO), range(6)))
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", *(f"{i}.txt" for i in range(6))]
    assert len(api.list_repo_commits(REPO)) == 7


def test_revisions_by_sha_and_branch(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    first = _model_repo(api, _weights(0))
    api.upload_file(path_or_fileobj=b'{"model_type": "mistral"}', path_in_repo="config.json", repo_id=REPO)
    assert _download(local_hub, "config.json", tmp_path, revision=first) == b'{"model_type": "llama"}'
    assert _download(local_hub, "config.json", tmp_path) == b'{"model_type": "mistral"}'

    api.create_branch(REPO, branch="old", revision=first)
    api.upload_file(path_or_fileobj=b"on a branch", path_in_repo="branch.txt", repo_id=REPO, revision="old")
    assert "branch.txt" in api.list_repo_files(REPO, revision="old") and "branch.txt" not in api.list_repo_files(REPO)
    titles = [c.title for c in api.list_repo_commits(REPO, revision="old")]
    assert titles == ["Upload branch.txt with huggingface_hub", "add model", "initial commit"]
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "old"}
    api.delete_branch(REPO, branch="old")
    assert not api.revision_exists(REPO, "old")


def test_errors_map_to_client_exceptions(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    _model_repo(api, _weights())
    with pytest.raises(RevisionNotFoundError):
        _download(local_hub, "config.json", tmp_path, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        _download(local_hub, "missing.json", tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/nothing", "config.json", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="f" * 40)
    assert not api.file_exists(REPO, "missing.json") and api.file_exists(REPO, "nested/dir/notes.txt")
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        api.delete_file("missing.json", repo_id=REPO)


def test_deletions(api: HfApi) -> None:
    _model_repo(api, _weights())
    ops = [CommitOperationDelete("config.json"), CommitOperationDelete("nested/", is_folder=True)]
    api.create_commit(REPO, ops, commit_message="prune")
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "model.safetensors"]


def test_preupload_then_commit_later(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    api.create_repo(REPO)
    weights = _weights(1)
    shard = CommitOperationAdd("model-00001-of-00001.safetensors", weights)
    api.preupload_lfs_files(REPO, [shard])
    assert local_hub.requests.count("PUT", r"^/storage/") == 1
    assert api.list_repo_files(REPO) == [".gitattributes"]  # uploaded, not committed
    api.create_commit(REPO, [shard, CommitOperationAdd("config.json", b"{}")], commit_message="shards")
    assert local_hub.requests.count("PUT", r"^/storage/") == 1  # the commit did not upload it again
    assert _download(local_hub, "model-00001-of-00001.safetensors", tmp_path) == weights
    # Same bytes under another name: the LFS batch answers "already stored" and the client skips the upload.
    api.upload_file(path_or_fileobj=weights, path_in_repo="copy.safetensors", repo_id=REPO)
    assert local_hub.requests.count("PUT", r"^/storage/") == 1
    # Unchanged files: preupload reports the oids already there, and the client skips the commit altogether.
    commits = local_hub.requests.count("POST", r"/commit/")
    api.create_commit(REPO, [CommitOperationAdd("config.json", b"{}"), CommitOperationAdd("model-00001-of-00001.safetensors", weights)], commit_message="same")
    assert local_hub.requests.count("POST", r"/commit/") == commits


def test_commit_of_never_uploaded_lfs_object_is_rejected(api: HfApi, local_hub: LocalHub) -> None:
    api.create_repo(REPO)
    lines = [
        {"key": "header", "value": {"summary": "dangling", "description": ""}},
        {"key": "lfsFile", "value": {"path": "ghost.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 10}},
    ]
    response = get_session().post(
        f"{local_hub.endpoint}/api/models/{REPO}/commit/main",
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        headers={"Content-Type": "application/x-ndjson"},
    )
    with pytest.raises(BadRequestError, match="ghost.safetensors"):
        hf_raise_for_status(response, endpoint_name="commit")  # what create_commit would raise
    assert api.list_repo_files(REPO) == [".gitattributes"]


def test_parent_commit_must_be_the_branch_head(api: HfApi) -> None:
    first = _model_repo(api, _weights())
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=REPO, parent_commit=first)
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=REPO, parent_commit=first)
    assert exc.value.response.status_code == 412
    assert "two.txt" not in api.list_repo_files(REPO)


def test_pull_requests(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    _model_repo(api, _weights())
    main_before = api.model_info(REPO).sha
    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert api.model_info(REPO).sha == main_before
    assert _download(local_hub, "pr.txt", tmp_path, revision="refs/pr/1") == b"proposal"
    api.upload_file(path_or_fileobj=b"more", path_in_repo="pr2.txt", repo_id=REPO, revision="refs/pr/1")
    assert {"pr.txt", "pr2.txt"} <= set(api.list_repo_files(REPO, revision="refs/pr/1"))
    second = api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="second", create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    prs = api.list_repo_refs(REPO, include_pull_requests=True).pull_requests or []
    assert [ref.ref for ref in prs] == ["refs/pr/1", "refs/pr/2"]


def test_repos_survive_a_restart_on_the_same_root(tmp_path: Path) -> None:
    weights = _weights()
    with LocalHub(tmp_path / "hub") as hub:
        sha = _model_repo(HfApi(endpoint=hub.endpoint, token="t"), weights)
        hub.set_private(REPO)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="t")
        info = api.model_info(REPO)
        assert info.sha == sha and info.private
        assert _download(hub, "model.safetensors", tmp_path) == weights
        api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id=REPO)
        assert len(api.list_repo_commits(REPO)) == 3


def test_multipart_upload(tmp_path: Path) -> None:
    weights = _weights(2, n=60_000)  # ~240 KB: three parts of 100 KB
    with LocalHub(tmp_path / "hub", multipart_chunk_size=100_000) as hub:
        api = HfApi(endpoint=hub.endpoint, token="t")
        api.create_repo(REPO)
        api.upload_file(path_or_fileobj=weights, path_in_repo="big.safetensors", repo_id=REPO)
        assert hub.requests.count("PUT", r"^/storage/.*/\d+/\d+$") == 3
        assert hub.requests.count("POST", r"/complete$", status=200) == 1
        assert _download(hub, "big.safetensors", tmp_path) == weights


# -- authorization ------------------------------------------------------------------------------------------------
def test_private_repos_need_a_token_that_can_read_them(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub", tokens=TOKENS) as hub:
        owner = HfApi(endpoint=hub.endpoint, token="hf_write")
        owner.create_repo(REPO, private=True)
        owner.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO)
        for token in (False, "hf_other"):
            with pytest.raises(RepositoryNotFoundError):
                HfApi(endpoint=hub.endpoint, token=token).model_info(REPO)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(REPO, "config.json", endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "c")
        assert HfApi(endpoint=hub.endpoint, token="hf_read").model_info(REPO).private
        with pytest.raises(HfHubHTTPError) as exc:
            HfApi(endpoint=hub.endpoint, token="hf_unknown").model_info(REPO)
        assert exc.value.response.status_code == 401 and not isinstance(exc.value, RepositoryNotFoundError)


def test_writes_need_write_access(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub", tokens=TOKENS) as hub:
        HfApi(endpoint=hub.endpoint, token="hf_write").create_repo(REPO)
        reader = HfApi(endpoint=hub.endpoint, token="hf_read")
        for client, status in ((reader, 403), (HfApi(endpoint=hub.endpoint, token=False), 401)):
            with pytest.raises(HfHubHTTPError) as exc:
                client.upload_file(path_or_fileobj=_weights(), path_in_repo="model.safetensors", repo_id=REPO)
            assert exc.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as exc:
            HfApi(endpoint=hub.endpoint, token="hf_write").create_repo("someone/else")
        assert exc.value.response.status_code == 403
        # Any signed-in reader may open a pull request, as on the Hub.
        pr = reader.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO, create_pr=True)
        assert pr.pr_revision == "refs/pr/1"


def test_gated_repo_files_need_accepted_terms(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub", tokens=TOKENS) as hub:
        owner = HfApi(endpoint=hub.endpoint, token="hf_write")
        owner.create_repo("me/gated")
        owner.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="me/gated")
        hub.set_gated("me/gated")
        assert HfApi(endpoint=hub.endpoint, token=False).model_info("me/gated").gated == "manual"
        for token in (False, "hf_other"):
            with pytest.raises(GatedRepoError):
                hf_hub_download("me/gated", "config.json", endpoint=hub.endpoint, token=token, cache_dir=tmp_path / "c")
        path = hf_hub_download("me/gated", "config.json", endpoint=hub.endpoint, token="hf_read", cache_dir=tmp_path)
        assert Path(path).read_bytes() == b"{}"


# -- faults -------------------------------------------------------------------------------------------------------
def test_5xx_retried_on_metadata_but_not_on_download(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    _model_repo(api, weights)
    local_hub.faults.add(Fault.status(503, method="HEAD", path=r"/resolve/", times=2))
    assert _download(local_hub, "model.safetensors", tmp_path / "a") == weights
    assert local_hub.requests.count("HEAD", r"/resolve/", status=503) == 2

    local_hub.faults.add(Fault.status(502, method="GET", path=r"^/storage/"))
    with pytest.raises(HfHubHTTPError) as exc:
        _download(local_hub, "model.safetensors", tmp_path / "b")
    assert exc.value.response.status_code == 502
    assert _download(local_hub, "model.safetensors", tmp_path / "b") == weights  # a new call succeeds


def test_rate_limit_is_waited_out(api: HfApi, local_hub: LocalHub) -> None:
    _model_repo(api, _weights())
    local_hub.faults.add(Fault.rate_limit(retry_after=0, method="GET", path=r"/tree/"))
    start = time.monotonic()
    assert "config.json" in api.list_repo_files(REPO)
    assert time.monotonic() - start >= 1  # Retry-After + 1 s
    assert local_hub.requests.count("GET", r"/tree/", status=429) == 1


def test_truncated_download_is_resumed(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    _model_repo(api, weights)
    fault = local_hub.faults.add(Fault.truncate(after_bytes=10_000, method="GET", path=r"^/storage/"))
    assert _download(local_hub, "model.safetensors", tmp_path) == weights
    assert fault.fired == 1 and local_hub.requests.count("GET", r"^/storage/") == 2


def test_connection_reset_mid_download_surfaces(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    _model_repo(api, weights)
    local_hub.faults.add(Fault.reset(after_bytes=10_000, method="GET", path=r"^/storage/"))
    with pytest.raises(httpx2.ReadError):  # not retried by huggingface_hub: callers must retry themselves
        _download(local_hub, "model.safetensors", tmp_path)
    assert _download(local_hub, "model.safetensors", tmp_path) == weights


def test_connection_reset_mid_upload_is_retried(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    api.create_repo(REPO)
    weights = _weights()
    local_hub.faults.add(Fault.reset_upload(after_bytes=5_000, method="PUT", path=r"^/storage/"))
    api.upload_file(path_or_fileobj=io.BytesIO(weights), path_in_repo="model.safetensors", repo_id=REPO)
    assert local_hub.requests.count("PUT", r"^/storage/", status=None) == 1
    assert local_hub.requests.count("PUT", r"^/storage/", status=200) == 1
    assert _download(local_hub, "model.safetensors", tmp_path) == weights


def test_commit_failing_after_lfs_upload(api: HfApi, local_hub: LocalHub) -> None:
    api.create_repo(REPO)
    weights = _weights()
    local_hub.faults.add(Fault.commit_fails())
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=REPO)
    assert exc.value.response.status_code == 500
    assert api.list_repo_files(REPO) == [".gitattributes"]  # nothing applied
    api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=REPO)
    assert local_hub.requests.count("PUT", r"^/storage/") == 1  # the retry found the object already stored


def test_commit_applied_but_response_lost(api: HfApi, local_hub: LocalHub) -> None:
    api.create_repo(REPO)
    local_hub.faults.add(Fault.reset(method="POST", path=r"/commit/"))
    with pytest.raises(httpx2.ReadError):
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO)
    assert "config.json" in api.list_repo_files(REPO)  # a blind retry would commit twice


def test_slow_responses(api: HfApi, local_hub: LocalHub, tmp_path: Path) -> None:
    weights = _weights()
    _model_repo(api, weights)
    # HEAD slower than etag_timeout: the client retries it with a longer timeout.
    local_hub.faults.add(Fault.delay(1.0, method="HEAD", path=r"/resolve/"))
    assert _download(local_hub, "model.safetensors", tmp_path / "a", etag_timeout=0.3) == weights
    quarter = len(weights) // 4 + 1
    local_hub.faults.add(Fault.throttle(chunk_size=quarter, seconds=0.1, method="GET", path=r"^/storage/"))
    start = time.monotonic()
    assert _download(local_hub, "model.safetensors", tmp_path / "b") == weights
    assert time.monotonic() - start >= 0.3


def test_probabilistic_faults_replay_with_a_seed() -> None:
    def firings() -> list[bool]:
        faults = FaultSet(seed=7)
        faults.add(Fault.status(503, probability=0.5, times=None))
        return [faults.take("GET", "/x") is not None for _ in range(40)]

    first = firings()
    assert first == firings() and 5 < sum(first) < 35


# -- packaging ----------------------------------------------------------------------------------------------------
def test_emulator_needs_neither_torch_nor_the_client() -> None:
    package = Path(__file__).resolve().parents[1] / "streamq"
    code = (
        "import sys, types; pkg = types.ModuleType('streamq'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['streamq'] = pkg;"  # skip streamq/__init__.py, which loads the quantizer (and torch)
        "import streamq.testing, streamq.testing.__main__;"
        "assert not {'torch', 'huggingface_hub', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(package)], check=True)


def test_command_line_serves_until_interrupted(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "streamq.testing", "--root", str(tmp_path / "hub"), "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            api = HfApi(endpoint=line.split(" at ")[1].strip(), token="t")
            api.create_repo(REPO)
            assert api.list_repo_files(REPO) == [".gitattributes"]
        finally:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    assert (tmp_path / "hub" / "repos" / "models" / REPO / "refs.json").is_file()
