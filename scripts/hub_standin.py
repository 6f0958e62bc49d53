"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, serving the bundled sample, with
faults on demand: the Hub code path, tested with no network but loopback.

    python scripts/hub_standin.py [--port 0] [--data data/wikitext_sample] [--fail-every N]
                                  [--status-every N CODE] [--delay S]
    HF_ENDPOINT=http://127.0.0.1:PORT python -c 'import datasets; ...load_dataset("wikitext", ...)'

--data is one repository, served under any name (wikitext, Salesforce/wikitext): a folder laid out
like the Hub's Salesforce/wikitext, a README.md whose YAML `configs` name the data files, and
`wikitext-103-v1/{split}-0000K-of-0000N.parquet` (the bundled sample is one); or a folder of
repositories, `<namespace>/<name>/` each with its README.md and files, served under their names.
A repository's commit id is a digest of its files' names and contents: change a file, restart the
stand-in, and it serves a new commit. The part of the API that
`datasets.load_dataset("wikitext", "wikitext-103-v1", split=..., streaming=True)` uses (read off
the installed huggingface_hub and datasets) and the URL that load_text_stream("auto") probes:

    HEAD/GET /datasets/{repo}/resolve/{revision}/{path}   file metadata and bytes (Range supported)
    GET      /api/datasets/{repo}[/revision/{revision}]   repository info with its files (siblings)
    GET      /api/datasets/{repo}/tree/{revision}[/{path}] folder listing (?recursive=1)
    POST     /api/datasets/{repo}/paths-info/{revision}   info on given paths

Faults: --fail-every N cuts every N-th file response off mid-body (the connection closes after half
the bytes); --status-every N CODE answers CODE (e.g. 429, 503) to every N-th request; --delay S
waits S seconds before every answer. On exit it prints how many of each it injected. It listens on
127.0.0.1 only; with --port 0 it picks a free port and prints `listening on http://127.0.0.1:PORT`.
"""

import argparse
import email.utils
import hashlib
import http.server
import json
import sys
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "wikitext_sample"


class Repo:
    """The files of one served repository, with a commit id that changes when any file does."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        data = [f for f in self.files if f.endswith((".parquet", ".jsonl", ".json", ".txt"))]
        if "README.md" not in self.files or not data:
            raise SystemExit(
                f"hub_standin: {folder} needs a README.md and data files (found {self.files or 'nothing'})"
            )
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(f"{name}\0{hashlib.sha1((folder / name).read_bytes()).hexdigest()}\n".encode())
        self.sha = digest.hexdigest()

    def entry(self, path: str) -> dict:
        """The tree / paths-info entry of a file or folder."""
        full = self.folder / path
        if full.is_dir():
            return {"type": "directory", "path": path, "oid": self.sha}
        data = full.read_bytes()
        oid = hashlib.sha1(data).hexdigest()
        entry = {"type": "file", "path": path, "size": len(data), "oid": oid}
        if path.endswith(".parquet"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def listing(self, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        names = set()
        for name in self.files:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if recursive:
                parts = rest.split("/")
                names.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            else:
                names.add(prefix + rest.split("/")[0])
        return [self.entry(name) for name in sorted(names)]


def load_repos(folder: Path) -> dict[str, Repo]:
    """{repository id: Repo}: "*" for a folder that is one repository (served under any name), else
    "<namespace>/<name>" for each such sub-folder holding a README.md."""
    if not folder.is_dir():
        raise SystemExit(f"hub_standin: data folder {folder} does not exist")
    if (folder / "README.md").is_file():
        return {"*": Repo(folder)}
    repos = {
        readme.parent.relative_to(folder).as_posix(): Repo(readme.parent)
        for readme in sorted(folder.glob("*/*/README.md"))
    }
    if not repos:
        raise SystemExit(
            f"hub_standin: {folder} needs a README.md and data files, or <namespace>/<name>/ folders "
            "that have them"
        )
    return repos


class Faults:
    """Counters of requests and of the faults injected, shared by the handler threads."""

    def __init__(self, fail_every: int, status_every: int, status_code: int, delay: float):
        self.fail_every, self.status_every, self.status_code, self.delay = (
            fail_every,
            status_every,
            status_code,
            delay,
        )
        self.lock = threading.Lock()
        self.requests = self.file_responses = self.cut = self.statuses = 0

    def _tick(self, counter: str, hits: str, every: int) -> bool:
        """Count one more `counter`; True (and one more `hits`) on every `every`-th (0: never)."""
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)
            hit = bool(every) and getattr(self, counter) % every == 0
            setattr(self, hits, getattr(self, hits) + hit)
            return hit

    def next_request(self) -> bool:
        """True if this request gets the fault status."""
        return self._tick("requests", "statuses", self.status_every)

    def next_file_response(self) -> bool:
        """True if this file response is cut off mid-body."""
        return self._tick("file_responses", "cut", self.fail_every)

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.file_responses} file responses; injected "
            f"{self.statuses} x HTTP {self.status_code}, {self.cut} bodies cut off"
        )


def make_handler(repos: dict[str, Repo], faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the summary says what happened
            pass

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            form = self.rfile.read(length).decode()
            self.answer(body=True, form=form)

        def send_json(self, value, status=200, headers=None, repo=None):
            data = json.dumps(value).encode()
            self.send_response(status)
            commit = {"X-Repo-Commit": repo.sha} if repo is not None else {}
            for name, text in {
                "Content-Type": "application/json",
                "Content-Length": str(len(data)),
                **commit,
                **(headers or {}),
            }.items():
                self.send_header(name, text)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def send_error_json(self, status, message, code=None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code  # huggingface_hub reads EntryNotFound from it
            if status in (429, 503):
                headers["Retry-After"] = "1"
            self.send_json({"error": message}, status, headers)

        def answer(self, body, form=""):
            if faults.delay:
                time.sleep(faults.delay)
            if faults.next_request():
                self.send_error_json(faults.status_code, f"injected {faults.status_code}")
                return
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
            if parts[:1] == ["datasets"] and "resolve" in parts:
                cut = parts.index("resolve")
                repo = self.repo("/".join(parts[1:cut]))
                if repo is not None:
                    self.send_file(repo, "/".join(parts[cut + 2 :]), body)
            elif parts[:2] == ["api", "datasets"]:
                rest = parts[2:]
                cut = next(
                    (i for i, p in enumerate(rest) if p in ("tree", "paths-info", "revision")), len(rest)
                )
                repo = self.repo("/".join(rest[:cut]))
                if repo is not None:
                    self.api(repo, rest, query, form)
            else:
                self.send_error_json(404, f"no route for {url.path}")

        def repo(self, name):
            """The repository `name` names, or None after a 404 (RepoNotFound)."""
            found = repos.get("*") or repos.get(name)
            if found is None:
                self.send_error_json(404, f"Repository {name} not found", code="RepoNotFound")
            return found

        def api(self, repo, parts, query, form):
            for verb in ("tree", "paths-info", "revision"):
                if verb in parts:
                    where = parts.index(verb)
                    rest = parts[where + 2 :]
                    break
            else:
                verb, rest = "info", []
            if verb == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                self.send_json(repo.listing("/".join(rest), recursive), repo=repo)
            elif verb == "paths-info":
                paths = urllib.parse.parse_qs(form).get("paths", [])
                found = [p for p in paths if (repo.folder / p).exists()]
                self.send_json([repo.entry(p) for p in found], repo=repo)
            else:
                siblings = [{"rfilename": name} for name in repo.files]
                self.send_json(
                    {
                        "id": "/".join(parts[: 2 if verb == "info" else parts.index("revision")])
                        or "wikitext",
                        "sha": repo.sha,
                        "private": False,
                        "gated": False,
                        "disabled": False,
                        "lastModified": "2026-11-26T00:00:00.000Z",
                        "siblings": siblings,
                        "tags": [],
                    },
                    repo=repo,
                )

        def send_file(self, repo, path, body):
            full = repo.folder / path
            if path not in repo.files:
                self.send_error_json(404, f"{path} not found", code="EntryNotFound")
                return
            data = full.read_bytes()
            start, end = 0, len(data) - 1
            status = 200
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                first, _, last = ranged[6:].split(",")[0].partition("-")
                if first:
                    start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
                else:  # the last N bytes
                    start, end = max(0, len(data) - int(last)), len(data) - 1
                status = 206
            chunk = data[start : end + 1]
            etag = hashlib.sha1(data).hexdigest()
            self.send_response(status)
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("Last-Modified", email.utils.formatdate(full.stat().st_mtime, usegmt=True))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if len(chunk) > 1 and faults.next_file_response():
                self.wfile.write(chunk[: len(chunk) // 2])  # half the body, then the connection drops
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(chunk)

    return Handler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port and print it")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder laid out like the Hub repository"
    )
    parser.add_argument(
        "--fail-every", type=int, default=0, metavar="N", help="cut every N-th file response off mid-body"
    )
    parser.add_argument("--status-every", nargs=2, type=int, default=(0, 503), metavar=("N", "CODE"))
    parser.add_argument("--delay", type=float, default=0.0, metavar="S", help="seconds before every answer")
    args = parser.parse_args(argv)
    if args.fail_every < 0 or args.status_every[0] < 0 or args.delay < 0:
        parser.error("--fail-every, --status-every N and --delay must not be negative")
    return args


def serve(args) -> None:
    repos = load_repos(args.data)
    faults = Faults(args.fail_every, args.status_every[0], args.status_every[1], args.delay)
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(repos, faults))
    except OSError as err:
        raise SystemExit(f"hub_standin: cannot listen on 127.0.0.1:{args.port}: {err.strerror}") from None
    server.daemon_threads = True
    print(
        f"listening on http://127.0.0.1:{server.server_port} (serving {args.data}: "
        + ", ".join(f"{name} {len(r.files)} files at {r.sha[:12]}" for name, r in repos.items())
        + ")",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print(faults.summary(), flush=True)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # print the summary on SIGTERM too
    try:
        serve(parse_args())
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            sys.exit(2)
        raise
