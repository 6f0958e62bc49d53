"""The token cache: each piece tokenized once, its tokens kept on disk, verified, and read again at
memory speed by later epochs, resumes and runs.

An entry is one piece as one part tokenized it (the whole piece, or the rows a part keeps of a
piece parts share: every k-th), in four files named by the key, a digest of what it is:

    KEY.tokens   the ids, uint16 (GPT-2's fit; uint32 for larger vocabularies), 2 bytes a token
    KEY.rows     (rows + 1,) int64 offsets: row k is tokens[rows[k]:rows[k + 1]]
    KEY.flags    (rows,) uint8: 1 a blank row (WikiText's layout), 2 a row without text
    KEY.json     the manifest: the identity (the piece: resolved path, size, modification time and
                 row group, or Hub repository, commit and file; the tokenizer; the document rule;
                 the text column; the rows kept), the counts, the dtype and a CRC-32 of each file

So a changed file, another commit, tokenizer, rule or dealing is another key, never a match. Each
file is written under a temporary name as the piece is tokenized (nothing more is held in memory)
and renamed when the piece is whole, the manifest last: a crash, or two ranks writing one piece,
never leave a half entry. Reading checks the manifest, the sizes and the CRCs (about 1 G tokens/s)
before a token is used; an entry that fails is said in one WARNING naming the piece and why, and
the piece is tokenized from its text again (and rewritten). A folder that cannot be written (read
only, full) is said once; the run goes on without writing.
"""

import collections
import contextlib
import hashlib
import json
import logging
import mmap
import os
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import CACHE_CHUNK_TOKENS, CACHE_RECENT_BYTES

logger = logging.getLogger(__name__)
VERSION = 1  # of the entries' layout: another version is another key
SUFFIXES = ("tokens", "rows", "flags")


def key_of(identity: dict) -> str:
    """The entry's name: 32 hex digits of SHA-256 over its identity."""
    text = json.dumps({"version": VERSION, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class Entry:
    """A verified entry: its tokens (memory-mapped), row offsets and flags."""

    tokens: np.ndarray  # (N,) uint16 or uint32, memory-mapped
    rows: np.ndarray  # (n + 1,) int64
    flags: np.ndarray  # (n,) uint8

    @property
    def n_rows(self) -> int:
        return len(self.flags)

    def chunks(self, first: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(row index, ids, starts, flags) of its rows from `first` on, about CACHE_CHUNK_TOKENS
        tokens at a time (whole rows; ids are views of the memory map)."""
        while first < self.n_rows:
            end = int(np.searchsorted(self.rows, self.rows[first] + CACHE_CHUNK_TOKENS, side="right")) - 1
            end = min(max(end, first + 1), self.n_rows)
            a, b = int(self.rows[first]), int(self.rows[end])
            yield first, self.tokens[a:b], self.rows[first : end + 1] - a, self.flags[first:end]
            first = end


class TokenCache:
    """The entries in `folder`: `open` a verified one, or `writer` a new one. Pickles to workers;
    each process verifies an entry once, and again when one of its files changes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(Path(folder).expanduser())
        self.writable = True  # False once writing failed in this process: said once
        self.said: set[str] = set()
        self.verified: dict[str, tuple] = {}  # key -> (its files' (inode, size, mtime), its manifest)
        self.recent: collections.OrderedDict = collections.OrderedDict()  # key -> (stamps, Entry)
        self.held = 0  # bytes of tokens of the recent entries

    def path(self, key: str, suffix: str) -> str:
        return os.path.join(self.folder, key[:2], f"{key}.{suffix}")

    def open(self, identity: dict, what: str) -> Entry | None:
        """The entry of `identity` if it is there and whole, else None; a damaged one is said once
        (`what` names the piece) and left to be written again."""
        key = key_of(identity)
        paths = {suffix: self.path(key, suffix) for suffix in ("json", *SUFFIXES)}
        try:  # an entry opened lately, its manifest and tokens the same files: no more to check
            quick = tuple(_stamp(os.stat(paths[s])) for s in ("json", "tokens"))
        except OSError:
            quick = None
        if key in self.recent and self.recent[key][0] == quick:
            self.recent.move_to_end(key)
            return self.recent[key][1]
        try:
            stats = {suffix: os.stat(path) for suffix, path in paths.items()}
        except OSError:
            if not os.path.exists(paths["json"]):
                return None  # not written yet
            stats = None
        try:
            if stats is None:
                raise ValueError("one of its files is missing")
            signature = tuple(_stamp(s) for s in stats.values())
            if self.verified.get(key, (None,))[0] != signature:
                self.verified[key] = (signature, _verified(paths, stats, identity))
            entry = _entry(paths, self.verified[key][1])
            self._remember(key, signature[:2], entry)
            return entry
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._say(
                f"token cache: {what}: entry {paths['json']} not used ({err}); tokenizing its text again"
            )
            return None

    def _remember(self, key: str, manifest: tuple, entry: Entry) -> None:
        """Keep the entries opened last, up to CACHE_RECENT_BYTES of tokens (small pieces' files are
        not opened again every epoch; memory stays bounded)."""
        self.recent[key] = (manifest, entry)
        self.held += entry.tokens.nbytes
        while len(self.recent) > 1 and self.held > CACHE_RECENT_BYTES:
            self.held -= self.recent.popitem(last=False)[1][1].tokens.nbytes

    def writer(self, identity: dict, what: str, dtype: np.dtype) -> "Writer | None":
        """A writer of the entry of `identity`, or None when this process cannot write here."""
        if not self.writable:
            return None
        try:
            return Writer(self, key_of(identity), identity, dtype, what)
        except OSError as err:
            self.failed(err)
            return None

    def failed(self, err: OSError) -> None:
        """Writing failed (a read-only folder, a full disk): said once, no more writing here."""
        self.writable = False
        self._say(f"token cache: cannot write to {self.folder} ({err}); going on without writing to it")

    def _say(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            logger.warning(message)

    def __getstate__(self) -> dict:
        fresh = {"said": set(), "verified": {}, "recent": collections.OrderedDict(), "held": 0}
        return {"folder": self.folder, "writable": self.writable, **fresh}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _verified(paths: dict[str, str], stats: dict, identity: dict) -> dict:
    """The manifest of an entry, after checking it names `identity` and that its files have the
    sizes and CRCs it gives; ValueError saying what differs."""
    with open(paths["json"]) as f:
        manifest = json.load(f)
    theirs = manifest.get("identity")
    if not isinstance(theirs, dict):
        raise ValueError("its manifest has no identity (damaged on disk)")
    if theirs != identity:
        field = next(
            (k for k in sorted(set(theirs) | set(identity)) if theirs.get(k) != identity.get(k)), "?"
        )
        raise ValueError(
            f"its manifest is of another {field}: {theirs.get(field)!r}, not {identity.get(field)!r}"
        )
    n_rows, n_tokens, itemsize = manifest["rows"], manifest["tokens"], np.dtype(manifest["dtype"]).itemsize
    sizes = {"tokens": n_tokens * itemsize, "rows": (n_rows + 1) * 8, "flags": n_rows}
    for suffix in SUFFIXES:
        if stats[suffix].st_size != sizes[suffix]:
            size, want = stats[suffix].st_size, sizes[suffix]
            raise ValueError(
                f"its .{suffix} file has {size:,} bytes, its manifest says {want:,} (cut short?)"
            )
        with open(paths[suffix], "rb") as f, _mapped(f, sizes[suffix]) as data:
            if zlib.crc32(data) != manifest["crc32"][suffix]:
                raise ValueError(f"its .{suffix} file does not match its CRC-32 (damaged on disk)")
    rows = np.fromfile(paths["rows"], np.int64)
    if rows[0] != 0 or rows[-1] != n_tokens or np.any(np.diff(rows) < 0):
        raise ValueError("its row offsets are not in order")
    return manifest


def _mapped(f: Any, size: int) -> Any:
    """The file's bytes, memory-mapped (an empty bytes object for an empty file)."""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"")


def _entry(paths: dict[str, str], manifest: dict) -> Entry:
    """The entry's arrays: tokens memory-mapped (pages read as they are used), rows and flags read."""
    dtype = np.dtype(manifest["dtype"])
    if manifest["tokens"]:
        with open(paths["tokens"], "rb") as f:
            tokens = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype)
    else:
        tokens = np.empty(0, dtype)
    return Entry(tokens, np.fromfile(paths["rows"], np.int64), np.fromfile(paths["flags"], np.uint8))


class Writer:
    """One entry being written as its piece is tokenized: `add` each TokenBatch of the piece in
    order, `finish` when the piece is whole (renamed into place), `abort` otherwise."""

    def __init__(self, cache: TokenCache, key: str, identity: dict, dtype: np.dtype, what: str) -> None:
        self.cache, self.key, self.identity, self.dtype, self.what = (
            cache,
            key,
            identity,
            np.dtype(dtype),
            what,
        )
        os.makedirs(os.path.dirname(cache.path(key, "json")), exist_ok=True)
        self.temp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.files: dict = {}
        self.crc = dict.fromkeys(SUFFIXES, 0)
        self.n_rows = self.n_tokens = 0
        try:
            for suffix in SUFFIXES:
                self.files[suffix] = open(self._temp(suffix), "wb")  # noqa: SIM115 - closed in finish/abort
            self._write("rows", np.zeros(1, np.int64))
        except OSError:
            self.abort()
            raise

    def _temp(self, suffix: str) -> str:
        return self.cache.path(self.key, suffix + self.temp)

    def _write(self, suffix: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        self.files[suffix].write(data)
        self.crc[suffix] = zlib.crc32(data, self.crc[suffix])

    def add(self, ids: np.ndarray, starts: np.ndarray, flags: np.ndarray) -> bool:
        """Append rows (ids (N,), starts (n + 1,), flags (n,)); False (and aborted) when the ids do
        not fit the dtype or the disk refuses."""
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            self.abort()
            return False
        try:
            self._write("tokens", ids.astype(self.dtype, copy=False))
            self._write("rows", starts[1:] + self.n_tokens)
            self._write("flags", flags.astype(np.uint8, copy=False))
        except OSError as err:
            self.abort()
            self.cache.failed(err)
            return False
        self.n_rows, self.n_tokens = self.n_rows + len(flags), self.n_tokens + len(ids)
        return True

    def finish(self) -> None:
        """Close and rename into place: the data files first, the manifest last."""
        manifest = {"identity": self.identity, "rows": self.n_rows, "tokens": self.n_tokens}
        manifest |= {"dtype": self.dtype.name, "crc32": self.crc, "piece": self.what}
        try:
            for f in self.files.values():
                f.close()
            with open(self._temp("json"), "w") as f:
                json.dump(manifest, f, indent=1)
            for suffix in (*SUFFIXES, "json"):
                os.replace(self._temp(suffix), self.cache.path(self.key, suffix))
        except OSError as err:
            self.abort()
            self.cache.failed(err)

    def abort(self) -> None:
        """Drop the temporary files (the piece was not read to its end, or writing failed)."""
        for f in self.files.values():
            f.close()
        for suffix in (*SUFFIXES, "json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._temp(suffix))


def cache_size(folder: str | Path) -> dict[str, Any]:
    """{"entries", "bytes", "tokens", "bytes_per_token"} of the whole entries in `folder`."""
    entries, size, tokens = 0, 0, 0
    for manifest in Path(folder).expanduser().glob("*/*.json"):
        try:
            tokens += json.loads(manifest.read_text())["tokens"]
        except (OSError, ValueError, KeyError):
            continue
        entries += 1
        size += sum(
            p.stat().st_size for p in manifest.parent.glob(manifest.stem + ".*") if ".tmp-" not in p.name
        )
    return {"entries": entries, "bytes": size, "tokens": tokens, "bytes_per_token": size / max(tokens, 1)}
