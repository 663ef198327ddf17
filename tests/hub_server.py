"""A tiny Hugging Face hub on 127.0.0.1 for tests, and cache layouts as huggingface_hub writes them.

Serves the endpoints huggingface_hub (2.x) calls for ``model_info`` + ``snapshot_download``:

- ``GET /api/models/{repo}[/revision/{rev}]``: ``id``, ``sha`` (the commit), ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (``type``, ``path``, ``size``, ``oid``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the bytes with ``X-Repo-Commit``, ``ETag`` (the
  sha256, as for LFS files), ``Content-Length``; ``Range: bytes=N-`` answers 206.

Errors carry the ``X-Error-Code`` huggingface_hub maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``). Faults for tests: ``drop_once`` (send the
headers and half the bytes of a file, then close the connection, once) and ``fail`` (answer 500
to a file's GET while set). Every request is logged as ``(method, path, Range header)``.

    with HubServer() as server:
        commit = server.add_repo("facebook/tiny", {"config.json": b"{}"})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False


def read_folder(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path (``/``-separated)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commit_of(files: dict[str, bytes], salt: str = "") -> str:
    digest = hashlib.sha1(salt.encode())
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


class HubServer:
    """A threaded HTTP server holding repositories in memory; ``url`` is what HF_ENDPOINT takes."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.drop_once: set[tuple[str, str]] = set()  # (repo, file): cut mid-file, the first GET only
        self.fail: set[tuple[str, str]] = set()  # (repo, file): 500 on every GET while listed
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",),
                 gated: bool = False) -> str:
        """Add a commit holding ``files`` to ``repo_id`` and point ``refs`` at it; returns the commit."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = gated
        commit = commit_of(files, salt=f"{repo_id}:{len(repo.commits)}")
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit
        return commit

    def requests(self, method: str | None = None) -> list[tuple[str, str, str | None]]:
        with self._lock:
            return [entry for entry in self.log if method is None or entry[0] == method]

    # -- helpers for the handler ----------------------------------------------------------------
    def commit(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        return revision if revision in repo.commits else repo.refs.get(revision)


def _split_repo(path: str, marker: str) -> tuple[str, str] | None:
    """``facebook/x/resolve/main/a.json`` -> (``facebook/x``, ``main/a.json``) for marker resolve."""
    if f"/{marker}/" not in path:
        return None
    repo_id, _, rest = path.partition(f"/{marker}/")
    return repo_id, rest


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- replies -----------------------------------------------------------------------------
        def _error(self, status: int, code: str, message: str = "") -> None:
            body = json.dumps({"error": message or code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message or code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data, commit: str | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            self.wfile.write(body)

        # -- routes ------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path).lstrip("/")
            with server._lock:
                server.log.append((self.command, "/" + path, self.headers.get("Range")))
            if path.startswith("api/models/"):
                self._api(path[len("api/models/"):])
            elif (split := _split_repo(path, "resolve")) is not None:
                self._resolve(*split)
            else:
                self._error(404, "RepoNotFound", f"no route {path}")

        def _repo(self, repo_id: str) -> Repo | None:
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return repo

        def _api(self, rest: str) -> None:
            tree = _split_repo(rest, "tree")
            revision_split = _split_repo(rest, "revision")
            repo_id, revision = (tree or revision_split or (rest, "main"))
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = server.commit(repo, revision.split("/")[0])
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = repo.commits[commit]
            if tree is not None:
                return self._json([{"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())])
            self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]})

        def _resolve(self, repo_id: str, rest: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            revision, _, name = rest.partition("/")
            commit = server.commit(repo, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if repo.gated:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
            data = repo.commits[commit].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}")
            if self.command == "GET" and (repo_id, name) in server.fail:
                return self._error(500, "InternalError", "injected failure")
            self._send_file(repo_id, name, data, commit)

        def _send_file(self, repo_id: str, name: str, data: bytes, commit: str) -> None:
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and self.command == "GET":
                start = int(ranged[len("bytes="):].split("-")[0] or 0)
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            key = (repo_id, name)
            with server._lock:
                drop = key in server.drop_once
                server.drop_once.discard(key)
            if drop:  # half the bytes, then the connection goes away
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


def write_cache(cache: str | os.PathLike, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                refs: tuple[str, ...] = ("main",)) -> Path:
    """A snapshot as huggingface_hub lays it out: ``blobs/<sha256>``, ``snapshots/<commit>/<file>``
    as relative links to the blobs, ``refs/<ref>`` holding the commit. Returns the snapshot folder."""
    root = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or commit_of(files, salt=repo_id)
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


__all__ = ["HubServer", "Repo", "commit_of", "read_folder", "write_cache"]
