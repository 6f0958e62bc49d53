"""Step 1, the source: a lazy stream of text rows from the Hugging Face Hub or from local files.

    stream = load_text_stream("auto")   # WikiText-103 from the Hub if it answers within 5 s, else the sample
    stream = load_text_stream("hub", repo="Salesforce/wikitext", config="wikitext-2-raw-v1")
    stream = load_text_stream(data_files="books/*.jsonl", text_column="content")

The result is a `TextStream`: a `datasets.IterableDataset` (every datasets method works) that also
knows what it reads, `stream.source` (a `SourceInfo`: files and sizes or the Hub commit, the pieces
and their sizes, the document layout if known). Later steps take that value as it is; a stream
derived with datasets' own methods (`.take()`, `.repeat()`) is a plain IterableDataset again, and
`tokenize_stream` says that its checkpoints then identify it by its description only.

"auto" never waits on a dead network for long: the probe runs in a daemon thread and gives up after
HUB_PROBE_SECONDS. Asking for the Hub explicitly ("hub") fails within those seconds when it cannot
be reached, instead of silently reading something else. Reading pieces (`read_piece_text`) turns
a damaged file into one error naming the file and the line or row group, and a Hub that goes away
into WARNINGs and, after HUB_READ_DEADLINE_SECONDS, an error naming what was being read.
"""

import contextlib
import functools
import glob
import hashlib
import importlib
import itertools
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow

from .checks import check_choice
from .config import (
    DATASET_CONFIG,
    DATASET_REPO,
    DATASET_SPLIT,
    HUB_PROBE_SECONDS,
    HUB_READ_DEADLINE_SECONDS,
    HUB_READ_RETRY_SECONDS,
    HUB_RETRIES,
    HUB_RETRY_SECONDS,
    HUB_RETRY_STATUSES,
    LOCAL_BUILDERS,
    OFFLINE_VALUES,
    ROOT,
    SAMPLE_BYTES,
    SAMPLE_DIR,
    SAMPLE_FILES,
    SOURCES,
    TEXT_COLUMN,
    WIKITEXT_CONFIGS,
)

logger = logging.getLogger(__name__)

DataFiles = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class SourceInfo:
    """What a text stream reads. Made by `load_text_stream`, carried by `TextStream.source`.

    description: one line for people ("local: data/wikitext_sample, 2 files").
    identity: what a checkpoint must match: {"files": fingerprint of paths, sizes, mtimes} for local
        files, {"hub": repo, "config", "revision": the resolved commit id} for the Hub; and "split".
    layout: "wikitext" when the source is known to be in WikiText's article layout, else None.
    row_chars: mean characters per row (parquet metadata or the first MiB), to size tokenizing batches.
    piece_names, piece_weights, piece_rows: one per piece (parquet row group or file) in reading
        order, where known: names for error messages, uncompressed bytes to balance ranks and
        workers, rows to check a checkpoint's positions before reading.
    """

    description: str
    identity: dict[str, str]
    layout: str | None = None
    row_chars: float | None = None
    piece_names: tuple[str, ...] | None = None
    piece_weights: tuple[int, ...] | None = field(default=None, repr=False)
    piece_rows: tuple[int, ...] | None = field(default=None, repr=False)
    local: tuple[tuple[str, int], ...] | None = field(default=None, repr=False)  # (file, row group or -1)
    builder: str | None = None  # "parquet", "json" or "text": how the local pieces are read


class TextStream(datasets.IterableDataset):
    """A `datasets.IterableDataset` of text rows that knows what it reads: `source` (a SourceInfo).

    Made only by `load_text_stream` (from the stream `datasets.load_dataset` returns).
    """

    source: SourceInfo

    @classmethod
    def of(cls, stream: datasets.IterableDataset, source: SourceInfo) -> "TextStream":
        """`stream` as a TextStream with `source`; its description becomes `source.description`."""
        text = cls.__new__(cls)
        text.__setstate__(dict(stream.__getstate__()))  # datasets' own pickling state: all of it
        text.source = source
        text.info.description = source.description
        return text

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows, as datasets yields them; a damaged local file raises one error naming it (and the
        line), not the bare decoding error from inside datasets."""
        try:
            yield from super().__iter__()
        except LOCAL_READ_ERRORS as err:
            raise located_error(self.source, err) from err


# ----------------------------------------------------------------------------------- the Hub
def offline_switch() -> str | None:
    """The name of the offline variable that is set (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").lower() in OFFLINE_VALUES:
            return name
    return None


def hub_status(timeout: float = HUB_PROBE_SECONDS, repo: str = DATASET_REPO) -> tuple[bool, str]:
    """(reachable, why): whether the Hub answers for dataset `repo` within `timeout` seconds.

    Not reachable at once when an offline switch is set. The request runs in a daemon thread, so
    even a hanging DNS lookup cannot hold the caller longer than `timeout`.
    """
    switch = offline_switch()
    if switch:
        return False, f"{switch} is set"
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/datasets/{repo}"
    answers: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                answers.append((response.status == 200, f"{url} answered {response.status}"))
        except OSError as err:  # URLError, HTTPError, timeouts, refused connections
            answers.append((False, f"{url}: {err}"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answers[0] if answers else (False, f"{url} did not answer within {timeout:g} s")


def hub_is_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """True if the Hub answers for the WikiText dataset within `timeout` seconds (see `hub_status`)."""
    return hub_status(timeout)[0]


def choose_source(source: str = "auto", repo: str = DATASET_REPO) -> tuple[str, str]:
    """(source, why): `source` resolved to "hub" or "local".

    "auto" probes the Hub (<= 5 s) and falls back to "local", saying why at WARNING. "hub" raises
    ConnectionError within those seconds if the Hub cannot be reached.
    """
    check_choice("source", source, SOURCES)
    if source == "local":
        return "local", "asked for"
    reachable, why = hub_status(repo=repo)
    if source == "hub" and not reachable:
        raise ConnectionError(
            f"source='hub' but the Hub cannot be reached ({why}); use source='local' or 'auto'"
        )
    if not reachable:
        logger.warning("auto: the Hub is not reachable (%s): streaming the bundled sample instead", why)
        return "local", f"auto fell back: {why}"
    return "hub", "asked for" if source == "hub" else "auto: the Hub answered"


def _retry_hub(what: str, call: Any) -> Any:
    """call(), retried HUB_RETRIES times with doubling waits while the Hub answers 429 or 5xx (each
    retry said at WARNING); the set-up requests huggingface_hub does not retry itself."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(HUB_RETRIES + 1):
        try:
            return call()
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status not in HUB_RETRY_STATUSES or attempt == HUB_RETRIES:
                raise
            wait = HUB_RETRY_SECONDS * 2**attempt
            logger.warning(
                "%s: the Hub answered %s: retry %d of %d in %g s",
                what,
                status,
                attempt + 1,
                HUB_RETRIES,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def resolve_revision(repo: str, revision: str | None) -> str:
    """The commit id that `revision` (a branch, tag or commit; None: the default branch) of dataset
    `repo` points to now: a checkpoint records it, and the stream reads exactly that commit."""
    from huggingface_hub import HfApi

    info = _retry_hub(f"{repo}: repository info", lambda: HfApi().dataset_info(repo, revision=revision))
    return info.sha


def load_hub_split(repo: str, config: str | None, split: str, revision: str) -> datasets.IterableDataset:
    """`split` of dataset `repo` (config `config`) at commit `revision`, streaming; set-up answers of
    429 or 5xx are retried (see `_retry_hub`)."""
    where = f"{repo} {config or ''} ({split})"
    return _retry_hub(
        where,
        lambda: datasets.load_dataset(repo, config, split=split, revision=revision, streaming=True),
    )


# ----------------------------------------------------------------------------------- local files
def _expand(pattern: str) -> list[Path]:
    """The files a path or glob pattern names; FileNotFoundError / IsADirectoryError naming it."""
    paths = sorted(map(Path, glob.glob(pattern))) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        raise FileNotFoundError(f"data file not found: no file matches {pattern}")
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(
                f"data file {path} is a directory: name its files (e.g. {path}/*.parquet)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"data file {path} is empty (0 bytes)")
    return paths


def _read_once(paths: list[Path]) -> list[str]:
    """`paths` with each file once (by its resolved path); a file named twice is said at WARNING."""
    seen: dict[Path, str] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            logger.warning("data_files names %s twice (also as %s): it is read once", path, seen[key])
            continue
        seen[key] = str(path)
    return list(seen.values())


def fingerprint(files: Sequence[str]) -> str:
    """A short digest of the files' resolved paths, sizes and modification times: a checkpoint
    saved on other files (swapped, edited, touched) is refused; the same files by another path are not."""
    digest = hashlib.sha1()
    for name in files:
        path = Path(name).resolve()
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{len(files)} file{'s' * (len(files) != 1)} #{digest.hexdigest()[:12]}"


def mean_row_chars(builder: str, files: Sequence[str]) -> float:
    """About how many characters a row holds: parquet from its metadata (uncompressed bytes per
    row), text and JSON lines from the first MiB of the first file."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        metas = [pq.ParquetFile(f).metadata for f in files]
        rows = sum(m.num_rows for m in metas)
        size = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
        return size / max(rows, 1)
    with open(files[0], "rb") as f:
        head = f.read(SAMPLE_BYTES)
    return len(head) / max(head.count(b"\n"), 1)


def local_pieces(builder: str, files: Sequence[str]) -> tuple[tuple, tuple, tuple | None]:
    """(names, weights, rows) of the pieces `datasets`' `reshard()` makes of local files, in its
    order: parquet row groups (uncompressed bytes, rows), else one piece per file (bytes; rows unknown)."""
    if builder != "parquet":
        return tuple(map(str, files)), tuple(Path(f).stat().st_size for f in files), None
    import pyarrow.parquet as pq

    names, weights, rows = [], [], []
    for name in files:
        meta = pq.ParquetFile(name).metadata
        for i in range(meta.num_row_groups):
            names.append(f"{name} (row group {i})")
            weights.append(meta.row_group(i).total_byte_size)
            rows.append(meta.row_group(i).num_rows)
    return tuple(names), tuple(weights), tuple(rows)


def parquet_pieces(files: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """(file, row group) of every piece of local parquet files, in `reshard()`'s order."""
    import pyarrow.parquet as pq

    return tuple((str(f), i) for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups))


@functools.lru_cache(maxsize=256)
def _parquet_file(path: str, pid: int) -> Any:
    """An open ParquetFile, one per file and process (a forked worker opens its own)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def local_data_files(
    data_files: DataFiles | None = None, split: str = DATASET_SPLIT
) -> tuple[str, list[str]]:
    """(builder, paths): the bundled sample's parquet files of `split`, or the user's files checked
    (each read once). builder is the reader for the files' type: "text", "json" or "parquet"."""
    if data_files is None:
        files = sorted(SAMPLE_DIR.glob(SAMPLE_FILES.format(split=split)))
        if not files:
            splits = sorted({f.name.split("-")[0] for f in SAMPLE_DIR.glob(SAMPLE_FILES.format(split="*"))})
            raise ValueError(f"the bundled sample has the splits {splits}, got split={split!r}")
        return "parquet", [str(f) for f in files]
    patterns = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    files = _read_once([path for pattern in map(str, patterns) for path in _expand(pattern)])
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    builders = {LOCAL_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data_files must all be one of {sorted(LOCAL_BUILDERS)}, got suffixes {suffixes}")
    return builders.pop(), files


def text_file_rows(files: list[str]) -> Iterator[dict[str, str]]:
    """The lines of text files, one row each with its "\\n" kept. Lines end at "\\n" only (a lone
    "\\r" is text, not a line break); a byte sequence that is not UTF-8 names the file and line."""
    for name in files:
        with open(name, "rb") as f:
            for number, line in enumerate(f, 1):  # binary mode: split on b"\n" only
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"data file {name}, line {number}: not valid UTF-8 (byte {line[err.start]:#04x} at "
                        f"byte {err.start} of the line): re-save the file as UTF-8"
                    ) from None
                yield {TEXT_COLUMN: text}


def locate_bad_json(name: str) -> str | None:
    """'data file X, line N: ...' for the first line of a JSON-lines file that is not UTF-8 or not
    a JSON object; None if every line reads."""
    with open(name, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                return f"data file {name}, line {number}: not valid UTF-8 (at byte {err.start} of the line)"
            except json.JSONDecodeError as err:
                return f"data file {name}, line {number}: not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(record, dict):
                return f"data file {name}, line {number}: a JSON {type(record).__name__}, not an object"
    return None


def damaged_file_error(builder: str, name: str, err: Exception) -> ValueError:
    """One clear error for a file datasets could not read: the file, the line where we can find it
    (JSON lines), and the fix."""
    where = locate_bad_json(name.split(" (row group")[0]) if builder == "json" else None
    if where:
        return ValueError(f"{where}: fix or remove that line")
    said = " ".join(str(err).split())  # one line
    return ValueError(
        f"cannot read {builder} data file {name}: {type(err).__name__}: {said}; is it a whole, valid "
        f"{builder} file? (re-create it, or leave it out of data_files)"
    )


def open_local(builder: str, files: list[str], split: str) -> datasets.IterableDataset:
    """A datasets stream of `files`: parquet and JSON through datasets' builders, text through
    `text_file_rows` (one piece per file)."""
    if builder == "text":
        features = datasets.Features({TEXT_COLUMN: datasets.Value("string")})
        return datasets.IterableDataset.from_generator(
            text_file_rows, features=features, gen_kwargs={"files": files}, split=split
        )
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    except (pyarrow.ArrowInvalid, ValueError, StopIteration) as err:  # a file datasets cannot read
        for name in files:  # find which one
            located = locate_bad_json(name) if builder == "json" else None
            if located:
                raise ValueError(f"{located}: fix or remove that line") from None
        raise ValueError(
            f"cannot read {builder} data files {files[:3]}: {type(err).__name__} {err}"
        ) from None


def select_text(stream: datasets.IterableDataset, text_column: str, where: str) -> datasets.IterableDataset:
    """`stream` with `text_column` renamed to "text" (only that column kept); ValueError naming the
    columns that exist if it has none of that name."""
    columns = stream.column_names
    if columns is not None and text_column not in columns:
        hint = "" if text_column != TEXT_COLUMN else " (pass text_column= to name another)"
        raise ValueError(f"no {text_column!r} column in {where}; its columns are {columns}{hint}")
    if text_column == TEXT_COLUMN:
        return stream
    return stream.select_columns([text_column]).rename_column(text_column, TEXT_COLUMN)


def is_wikitext(repo: str | None, config: str | None) -> bool:
    """True for the WikiText family: one of its four configs (on the Hub, or a copy in its layout)."""
    return config in WIKITEXT_CONFIGS and (repo is None or repo.split("/")[-1] == "wikitext")


def local_config(files: Sequence[str]) -> str | None:
    """The WikiText config a copy in the Hub's layout is under (its files' folder), else None."""
    folders = {Path(f).parent.name for f in files}
    return folders.pop() if len(folders) == 1 and folders <= set(WIKITEXT_CONFIGS) else None


def load_text_stream(
    source: str = "auto",
    *,
    data_files: DataFiles | None = None,
    split: str = DATASET_SPLIT,
    repo: str = DATASET_REPO,
    config: str | None = DATASET_CONFIG,
    revision: str | None = None,
    text_column: str = TEXT_COLUMN,
) -> TextStream:
    """Step 1: a lazy `TextStream` (a `datasets.IterableDataset`) of rows with a `text` column.

    source: "hub" streams `repo` / `config` / `split` at `revision` (default: wikitext-103-v1's
    train split, the default branch, resolved to its commit id); "local" streams the bundled sample
    (or `data_files`: .txt one row per line with its "\\n" kept, .json/.jsonl/.parquet with a text
    field); "auto" picks the Hub when it answers within 5 s, else local.
    text_column: the column holding the text (renamed to `text`; the others are dropped).
    The choice and why are in `stream.info.description` (e.g. "local: data/wikitext_sample, 2 files").
    """
    if data_files is not None and source == "auto":
        source, why = "local", "data_files given"
    else:
        source, why = choose_source(source, repo)
    if data_files is not None and source == "hub":
        raise ValueError("data_files are local files: use source='local' (or 'auto') with them")
    if source == "hub":
        return load_hub_stream(repo, config, split, revision, text_column)
    builder, files = local_data_files(data_files, split)
    stream = select_text(open_local(builder, files, split), text_column, files[0])
    where = os.path.relpath(SAMPLE_DIR, ROOT) if data_files is None else ", ".join(files[:3])
    note = "" if why in ("asked for", "data_files given") else f" ({why})"
    names, weights, rows = local_pieces(builder, files)
    wikitext = data_files is None or is_wikitext(None, local_config(files))
    info = SourceInfo(
        description=f"local: {where}, {len(files)} file{'s' * (len(files) > 1)}{note}",
        identity={"files": fingerprint(files), "split": split, "text_column": text_column},
        layout="wikitext" if wikitext else None,
        row_chars=mean_row_chars(builder, files),
        piece_names=names,
        piece_weights=weights,
        piece_rows=rows,
        local=parquet_pieces(files) if builder == "parquet" else tuple((f, -1) for f in files),
        builder=builder,
    )
    return TextStream.of(stream, info)


def load_hub_stream(
    repo: str, config: str | None, split: str, revision: str | None, text_column: str
) -> TextStream:
    """A Hub dataset's split as a TextStream, pinned to the commit `revision` resolves to now."""
    commit = resolve_revision(repo, revision)
    stream = select_text(load_hub_split(repo, config, split, commit), text_column, f"{repo} {config}")
    pinned = "" if revision in (None, commit) else f" at {revision}"
    names, weights, rows = hub_pieces(repo, config, split, commit)
    info = SourceInfo(
        description=f"hub: {repo} {config or ''} ({split}){pinned}".replace("  ", " "),
        identity={"hub": repo, "config": str(config), "split": split, "revision": commit},
        layout="wikitext" if is_wikitext(repo, config) else None,
        piece_names=names,
        piece_weights=weights,
        piece_rows=rows,
    )
    return TextStream.of(stream, info)


def hub_pieces(repo: str, config: str | None, split: str, commit: str) -> tuple:
    """(names, weights, rows) of the pieces of a Hub split of parquet files, in `reshard()`'s order
    (the data files datasets resolves, their row groups from each file's footer), or (None, None,
    None) where they cannot be had (other formats; the Hub not answering: said at INFO)."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem
    from huggingface_hub.errors import HfHubHTTPError

    try:
        builder = datasets.load_dataset_builder(repo, config, revision=commit)
        files = [str(f) for f in builder.config.data_files[split]]
        if not files or not all(f.endswith(".parquet") for f in files):
            return None, None, None
        names, weights, rows = [], [], []
        fs = HfFileSystem()
        for url in files:
            with fs.open(url.removeprefix("hf://"), "rb") as f:
                meta = pq.ParquetFile(f).metadata
            for i in range(meta.num_row_groups):
                names.append(f"{url} (row group {i})")
                weights.append(meta.row_group(i).total_byte_size)
                rows.append(meta.row_group(i).num_rows)
    except (OSError, ValueError, KeyError, HfHubHTTPError) as err:
        logger.info("%s %s: its pieces' sizes are unknown (%s: %s)", repo, config, type(err).__name__, err)
        return None, None, None
    return tuple(names), tuple(weights), tuple(rows)


# ----------------------------------------------------------------------------------- reading pieces
class Pieces:
    """A stream cut into its pieces (`piece_streams`); `get(piece)` is that piece's own stream,
    made once per process: datasets' `shard()` deep-copies the stream's info and makes a
    shared-memory tensor every time it is called."""

    def __init__(self, stream: datasets.IterableDataset) -> None:
        self.stream = piece_streams(stream)
        self._open: dict[tuple[int, int], datasets.IterableDataset] = {}

    @property
    def num_shards(self) -> int:
        return self.stream.num_shards

    def get(self, piece: int) -> datasets.IterableDataset:
        key = (os.getpid(), piece)
        if key not in self._open:
            self._open[key] = self.stream.shard(num_shards=self.num_shards, index=piece, contiguous=True)
        return self._open[key]

    def __getstate__(self) -> dict:
        return {"stream": self.stream, "_open": {}}  # each process opens its own


def piece_streams(stream: datasets.IterableDataset) -> datasets.IterableDataset:
    """`stream` cut into its pieces (parquet: one per row group; else its shards, e.g. files)."""
    try:
        return stream.reshard()
    except NotImplementedError:  # not splittable further: its shards are the pieces
        return stream


@dataclass
class ReadProgress:
    """What a piece reader has read so far: rows of this piece; for a Hub that went away, the tries
    since the last batch that came, and when the first of them began (time.monotonic())."""

    rows: int = 0
    retries: int = 0
    pulled: float = 0.0  # when the current pull began
    failing_since: float | None = None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The errors a stream from a Hub that went away raises: connection errors and timeouts (OSError,
    requests' errors among them), HTTP errors, and httpx's where huggingface_hub uses httpx."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: tuple[type[BaseException], ...] = (OSError, HfHubHTTPError)
    for name in ("httpx", "httpx2"):  # huggingface_hub 2.x ships its own copy, httpx2
        try:
            errors = (*errors, importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return errors


def read_piece_text(
    pieces: "Pieces | datasets.IterableDataset",
    piece: int | None,
    start_row: int,
    batch_rows: int,
    *,
    step: int = 1,
    offset: int = 0,
    source: SourceInfo | None = None,
) -> Iterator[tuple[int, Any]]:
    """The text of one piece (None: the whole stream, in one pass) from row `start_row`, in
    batches: yields (row index of the batch's first row within the piece, texts: an Arrow string
    array, or a list of str or None for an untyped stream). With step > 1 only the rows whose
    index % step == offset (the others are read and skipped).

    A local file datasets cannot read raises one ValueError naming it (and the line, for JSON
    lines). A Hub read that fails is retried, each time said at WARNING, until `hub_deadline()`
    seconds after the first failing attempt began, then ConnectionError naming the repository,
    the file and the rows read. huggingface_hub retries each HTTP read itself (its WARNINGs name the
    file; ~23 s), so the whole wait is the deadline plus at most one such cycle: about a minute by
    default. (datasets would repeat that cycle 20 times, ~10 minutes: while we pull, it tries once.)
    """
    progress = ReadProgress(rows=start_row)
    hub = source is not None and "hub" in source.identity
    while True:
        try:
            yield from _piece_batches(pieces, piece, progress, batch_rows, step, offset, source)
            return
        except _hub_errors() as err:
            if not hub:
                raise _local_error(source, piece, err) from err
            _wait_for_hub(source, piece, progress, err)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, UnicodeDecodeError) as err:
            raise _local_error(source, piece, err) from err


def hub_deadline() -> float:
    """Seconds a stream keeps retrying a Hub that went away: STREAMING_LM_HUB_DEADLINE, else
    HUB_READ_DEADLINE_SECONDS."""
    return float(os.environ.get("STREAMING_LM_HUB_DEADLINE", HUB_READ_DEADLINE_SECONDS))


@contextlib.contextmanager
def one_datasets_try() -> Iterator[None]:
    """datasets' streaming reads try once while this holds (its documented config values, restored
    after): our reader retries with a deadline and says so."""
    names = ("READ_MAX_RETRIES", "OPEN_MAX_RETRIES", "READ_RETRY_INTERVAL", "OPEN_RETRY_INTERVAL")
    saved = {name: getattr(datasets.config, f"STREAMING_{name}") for name in names}
    for name in names:
        setattr(datasets.config, f"STREAMING_{name}", 1 if name.endswith("RETRIES") else 0)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(datasets.config, f"STREAMING_{name}", value)


def _arrow_batches(
    pieces: "Pieces | datasets.IterableDataset", piece: int | None, batch_rows: int, source: SourceInfo | None
) -> tuple[Iterator[Any], bool]:
    """(batches, typed) of one piece. Local files are read directly (pyarrow for parquet row groups
    and JSON lines, `text_file_rows` for text): going through datasets costs ~1 ms per piece to set
    up, and its `shard()` splits the whole file list each time (2,000 files: 22x the time of 500).
    Other streams (the Hub, in-memory, generators) go through datasets: Arrow tables when the
    stream is typed, dicts of Python lists when not."""
    if piece is not None and source is not None and source.local is not None:
        return local_batches(source, piece, batch_rows)
    one = pieces if piece is None else pieces.get(piece)
    typed = one.features is not None  # arrow-backed: whole batches as Arrow arrays, no per-row Python
    batches = (
        one.with_format("arrow").iter(batch_size=batch_rows) if typed else one.iter(batch_size=batch_rows)
    )
    return batches, typed


def local_batches(source: SourceInfo, piece: int, batch_rows: int) -> tuple[Iterator[Any], bool]:
    """(batches, typed) of a local piece: Arrow record batches of its text column, or (text files)
    dicts of Python lists."""
    path, group = source.local[piece]
    column = source.identity.get("text_column", TEXT_COLUMN)
    if source.builder == "parquet":
        batches = _parquet_file(path, os.getpid()).iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=[column], use_threads=False
        )
        return (_utf8_checked(b.rename_columns([TEXT_COLUMN])) for b in batches), True
    if source.builder == "json" and path.endswith(".jsonl"):
        import pyarrow.json as pj

        options = pj.ParseOptions(
            explicit_schema=pyarrow.schema([(column, pyarrow.string())]), unexpected_field_behavior="ignore"
        )
        batches = pj.open_json(path, parse_options=options)
        return (_utf8_checked(b.rename_columns([TEXT_COLUMN])) for b in batches), True
    if source.builder == "text":
        return _text_batches(path, batch_rows), False
    one = datasets.load_dataset(
        "json", data_files=[path], split="train", streaming=True
    )  # a .json array file
    return one.with_format("arrow").iter(batch_size=batch_rows), True


def _utf8_checked(batch: Any) -> Any:
    """`batch`, after checking its text is valid UTF-8 (pyarrow's JSON and parquet readers keep bad
    bytes in a string array; they would fail later, far from the file): ArrowInvalid if not."""
    batch.column(TEXT_COLUMN).validate(full=True)
    return batch


def _text_batches(path: str, batch_rows: int) -> Iterator[dict[str, list[str]]]:
    """The lines of one text file, `batch_rows` at a time, as {"text": [...]}."""
    rows = (row[TEXT_COLUMN] for row in text_file_rows([path]))
    while chunk := list(itertools.islice(rows, batch_rows)):
        yield {TEXT_COLUMN: chunk}


def _piece_batches(
    pieces: "Pieces | datasets.IterableDataset",
    piece: int | None,
    progress: ReadProgress,
    batch_rows: int,
    step: int,
    offset: int,
    source: SourceInfo | None,
) -> Iterator[tuple[int, list]]:
    """Batches of one piece from row `progress.rows`, advancing it (see `read_piece_text`)."""
    batches, typed = _arrow_batches(pieces, piece, batch_rows, source)
    seen = 0
    for batch in _pulled(batches, progress, source):
        columns = batch.column_names if typed else list(batch)
        if TEXT_COLUMN not in columns:
            raise ValueError(f"the stream has no {TEXT_COLUMN!r} column; its columns are {sorted(columns)}")
        texts = batch[TEXT_COLUMN] if not typed else batch.column(TEXT_COLUMN)
        n = len(texts)
        if seen + n <= progress.rows:  # before the start row (or read before a retry)
            seen += n
            continue
        skip = progress.rows - seen
        texts = texts[skip:] if skip else texts
        first, seen = progress.rows, seen + n
        texts = texts.combine_chunks() if typed and isinstance(texts, pyarrow.ChunkedArray) else texts
        if step > 1:
            keep = [i for i in range(len(texts)) if (first + i) % step == offset]
            if not keep:
                progress.rows = seen
                continue
            texts = texts.take(keep) if typed else [texts[i] for i in keep]
            first += keep[0]
        progress.rows = seen
        yield first, texts if typed else list(texts)
    if progress.rows - seen >= step:  # a start row past the piece's end: no run could be there
        raise ValueError(
            f"corrupt checkpoint: position row={progress.rows}, but piece {piece} has {seen} rows"
        )


def _pulled(batches: Iterator[Any], progress: ReadProgress, source: SourceInfo | None) -> Iterator[Any]:
    """`batches`, each pull timed in `progress`; a Hub source's pulls try once in datasets."""
    hub = source is not None and "hub" in source.identity
    while True:
        progress.pulled = time.monotonic()
        with one_datasets_try() if hub else contextlib.nullcontext():
            batch = next(batches, None)
        if batch is None:
            return
        progress.retries, progress.failing_since = 0, None  # it came: a new failure starts afresh
        yield batch


def _wait_for_hub(source: SourceInfo, piece: int | None, progress: ReadProgress, err: Exception) -> None:
    """After a failed Hub read: WARNING and a wait before the next try, or ConnectionError once the
    first failing try began more than hub_deadline() seconds ago."""
    progress.retries += 1
    progress.failing_since = progress.failing_since or progress.pulled
    identity, deadline = source.identity, hub_deadline()
    where = f"{identity['hub']} ({identity.get('config')}, {identity['split']})"
    names = source.piece_names
    file = names[piece] if names and piece is not None and piece < len(names) else f"piece {piece}"
    waited = time.monotonic() - progress.failing_since
    if waited + HUB_READ_RETRY_SECONDS > deadline:
        raise ConnectionError(
            f"the Hub went away while streaming {where} at commit {identity['revision'][:12]}: {file}, "
            f"{progress.rows} of its rows read; {progress.retries} tries over {waited:.0f} s (the limit: "
            f"STREAMING_LM_HUB_DEADLINE={deadline:g} s); last error: {type(err).__name__}: {str(err)[:300]}"
        ) from err
    logger.warning(
        "the Hub did not answer reading %s, %s after %d rows (%s: %.120s): try %d failed, %.0f s since the "
        "first; next in %g s, giving up %g s after the first",
        where,
        file,
        progress.rows,
        type(err).__name__,
        err,
        progress.retries,
        waited,
        HUB_READ_RETRY_SECONDS,
        deadline,
    )
    time.sleep(HUB_READ_RETRY_SECONDS)


LOCAL_READ_ERRORS = (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, UnicodeDecodeError, OSError)


def peek_texts(stream: datasets.IterableDataset, n: int, source: SourceInfo | None) -> list[str]:
    """The texts of the first `n` rows of `stream`. A damaged local file raises the error reading it
    would (the file and line), not the bare decoding error from inside datasets."""
    try:
        return [row[TEXT_COLUMN] for row in itertools.islice(stream, n)]
    except LOCAL_READ_ERRORS as err:
        raise located_error(source, err) from err


def located_error(source: SourceInfo | None, err: Exception) -> Exception:
    """`err` from reading a local source as one clear error: the JSON-lines file and line that is
    damaged, else the first file; a Hub error (or an unknown source's) is returned as it is."""
    if source is None or "hub" in source.identity:
        return err  # retrying the Hub belongs to the piece reader
    names = source.piece_names or ()
    json_files = [name for name in names if name.endswith((".json", ".jsonl"))]
    located = next(filter(None, map(locate_bad_json, json_files)), None)
    if located:
        return ValueError(f"{located}: fix or remove that line")
    return _local_error(source, first_bad_piece(source), err)


def first_bad_piece(source: SourceInfo) -> int:
    """The first local parquet piece (file, row group) whose text column does not read; 0 if none
    fails or the pieces are not parquet row groups."""
    for piece, (path, group) in enumerate(source.local or ()):
        if group < 0:
            return 0
        try:
            _parquet_file(path, os.getpid()).read_row_group(group, columns=[source.identity["text_column"]])
        except LOCAL_READ_ERRORS:
            return piece
    return 0


def _local_error(source: SourceInfo | None, piece: int, err: Exception) -> Exception:
    """The clear error for a piece of local data that cannot be read (the file, line or row group)."""
    if isinstance(err, ValueError) and str(err).startswith("data file "):
        return err  # already names the file and line (text_file_rows)
    names = source.piece_names if source is not None else None
    if not names or piece >= len(names):
        return err
    builder = "json" if names[piece].endswith((".json", ".jsonl")) else "parquet"
    return damaged_file_error(builder, names[piece], err)
