"""A small stand-in for the Hugging Face Hub's HTTP API, for push/pull tests on a machine without internet.

It is a stand-in, not a Hub: in-memory repositories, every file stored as a regular (base64) git blob, no LFS or Xet,
no server-side validation of cards, no gating or rate limits. What it does answer is what the real `huggingface_hub`
client asks for when `create_repo`, `create_branch`, `upload_folder` (preupload, then one commit), `model_info`,
`list_repo_tree` / `get_paths_info` and `hf_hub_download` / `from_pretrained` run against it, with the reply fields
and headers that client reads (`X-Repo-Commit`, `ETag`, `Content-Length`; `X-Error-Code` on a 404).

    hub = HubStandIn().start()        # http://127.0.0.1:<port>; hub.url for HF_ENDPOINT
    ...
    hub.stop()

A commit is applied all at once or not at all, as on the Hub; `hub.fail_next_commit = True` makes the next commit
fail (HTTP 500) after its body was received, to test that a failed push leaves nothing half-written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # branch -> its commits, newest last

    def commit_at(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.branches[revision][-1]
        for commits in self.branches.values():
            for commit in commits:
                if commit.oid == revision:
                    return commit
        return None


def _oid(data: bytes) -> str:
    """The git blob id of `data`, as the Hub reports it for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """An in-process HTTP server answering a subset of the Hub API (see the module docstring)."""

    user = "hf-ext-tester"

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.authorizations: list[str] = []  # the Authorization headers received
        self.fail_next_commit = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandIn:
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` ({} when the repository has no commit there)."""
        repo = self.repos.get((repo_type, repo_id))
        commit = repo.commit_at(revision) if repo else None
        return dict(commit.files) if commit else {}

    # the API
    def create_repo(self, body: dict, authorized: bool):
        if not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            private = bool(body.get("private")) or body.get("visibility") == "private"  # older and newer clients
            repo = Repo(repo_id, repo_type, private)
            repo.branches["main"] = [Commit(_oid(repo_id.encode()), "initial commit", {})]
            self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def commit(self, repo: Repo, revision: str, body: bytes):
        operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self._lock:
            if self.fail_next_commit:
                self.fail_next_commit = False
                return 500, {"error": "Internal Error (stand-in: commit failure injected)"}, {}
            if revision not in repo.branches:
                return 404, {"error": f"Revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"}
            files = dict(repo.branches[revision][-1].files)
            message = ""
            for operation in operations:
                key, value = operation["key"], operation["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:  # lfsFile: the stand-in never asks for LFS uploads
                    return 400, {"error": f"unsupported commit operation {key}"}, {}
            oid = hashlib.sha1(json.dumps([repo.repo_id, revision, len(repo.branches[revision]), message,
                                           sorted((p, _oid(d)) for p, d in files.items())]).encode()).hexdigest()
            repo.branches[revision].append(Commit(oid, message, files))
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}

    def info(self, repo: Repo, revision: str):
        commit = repo.commit_at(revision)
        if commit is None:
            return 404, {"error": f"Revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"}
        return 200, {
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)], "tags": [], "downloads": 0, "likes": 0,
        }, {}

    @staticmethod
    def entry(path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": _oid(data)}


_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/{_REPO}/branch/(?P<rev>[^/]+)"), "branch"),
    ("POST", re.compile(rf"/api/{_REPO}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    ("GET", re.compile(rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    ("GET", _RESOLVE, "resolve"),
    ("HEAD", _RESOLVE, "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    stand_in: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the tests assert on `stand_in.requests`
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: dict | list | bytes, headers: dict | None = None, head: bool = False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _dispatch(self, method: str):
        hub = self.stand_in
        url = urlparse(self.path)
        hub.requests.append((method, url.path))
        authorization = self.headers.get("Authorization", "")
        if authorization:
            hub.authorizations.append(authorization)
        authorized = authorization.startswith("Bearer ") and len(authorization) > len("Bearer ")
        body = self._body() if method == "POST" else b""
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(url.path)
            if route_method == method and match:
                status, reply, headers = self._route(name, match, body, parse_qs(url.query), authorized)
                return self._reply(status, reply, headers, head=method == "HEAD")
        return self._reply(404, {"error": f"stand-in: no route for {method} {url.path}"}, head=method == "HEAD")

    def _route(self, name: str, match: re.Match, body: bytes, query: dict, authorized: bool):
        hub = self.stand_in
        if name == "create":
            return hub.create_repo(json.loads(body or b"{}"), authorized)
        if name == "validate_yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if name == "whoami":
            if not authorized:
                return 401, {"error": "Invalid credentials in Authorization header"}, {}
            return 200, {"name": hub.user, "type": "user", "auth": {"type": "access_token"}}, {}
        groups = match.groupdict()
        repo = hub.repos.get((groups.get("type") or "model", unquote(groups["repo"])))
        if repo is None or (repo.private and not authorized):
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        revision = unquote(groups.get("rev") or "main")
        if name in ("preupload", "commit", "branch") and not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        if name == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}, {}
        if name == "commit":
            return hub.commit(repo, revision, body)
        if name == "branch":
            if revision in repo.branches:
                return 409, {"error": f"Branch {revision} already exists"}, {}
            start = repo.commit_at(json.loads(body or b"{}").get("startingPoint") or "main")
            repo.branches[revision] = [start]
            return 200, {}, {}
        if name == "info":
            return hub.info(repo, revision)
        commit = repo.commit_at(revision)
        if commit is None:
            return 404, {"error": f"Revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"}
        if name == "paths_info":
            wanted = json.loads(body or b"{}").get("paths") if body.startswith(b"{") else parse_qs(body.decode()).get("paths")
            return 200, [hub.entry(p, commit.files[p]) for p in (wanted or []) if p in commit.files], {}
        if name == "tree":
            prefix = unquote(groups.get("path") or "").strip("/")
            prefix = prefix + "/" if prefix else ""
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, folders = [], set()
            for path, data in sorted(commit.files.items()):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append(hub.entry(path, data))
            entries += [{"type": "directory", "path": f, "oid": _oid(f.encode()), "size": 0} for f in sorted(folders)]
            return 200, entries, {}
        # resolve
        path = unquote(groups["path"])
        if path not in commit.files:
            return 404, {"error": f"Entry {path} not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}
        data = commit.files[path]
        return 200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{_oid(data)}"', "Content-Type": "application/octet-stream"}
