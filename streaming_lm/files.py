"""Local files: which files a pattern names, their pieces (parquet row groups, else files), their
fingerprint, and one clear error naming the file and the line (JSON lines) or row group (parquet)
for a file that cannot be read.

Text files are one row per line, split on "\\n" only, the "\\n" kept (a lone "\\r" or a U+2028 is
text); a byte sequence that is not UTF-8 names the file and line.
"""

import functools
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow

from .config import (
    DATASET_SPLIT,
    LOCAL_BUILDERS,
    SAMPLE_BYTES,
    SAMPLE_DIR,
    SAMPLE_FILES,
    TEXT_COLUMN,
    WIKITEXT_CONFIGS,
)

if TYPE_CHECKING:
    from .source import SourceInfo

logger = logging.getLogger(__name__)
DataFiles = str | Path | Sequence[str | Path]


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


def parquet_file(path: str) -> Any:
    """An open ParquetFile, one per file, process and version of the file (a forked worker opens
    its own; a file rewritten since is opened again)."""
    stat = os.stat(path)
    return _parquet_file(path, os.getpid(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _parquet_file(path: str, pid: int, mtime_ns: int, size: int) -> Any:
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


def local_config(files: Sequence[str]) -> str | None:
    """The WikiText config a copy in the Hub's layout is under (its files' folder), else None."""
    folders = {Path(f).parent.name for f in files}
    return folders.pop() if len(folders) == 1 and folders <= set(WIKITEXT_CONFIGS) else None


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


LOCAL_READ_ERRORS = (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, UnicodeDecodeError, OSError)


def locate_bad_json(name: str, column: str | None = None) -> str | None:
    """'data file X, line N: ...' for the first line of a JSON-lines file that is not UTF-8, not a
    JSON object, or whose `column` holds something other than text; None if every line reads."""
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
            value = record.get(column)
            if column is not None and value is not None and not isinstance(value, str):
                kind = {int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}
                what = f"{kind.get(type(value), type(value).__name__)} {json.dumps(value)[:60]}"
                return (
                    f"data file {name}, line {number} (row {number - 1}), key {column!r}: a {what}, not text"
                )
    return None


def missing_key_error(path: str, column: str) -> ValueError:
    """The error for a JSON-lines file none of whose lines has the text's key: its first line's keys."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"{}")
    keys = sorted(json.loads(first)) if first.strip().startswith(b"{") else []
    return ValueError(
        f"data file {path}: no line has the key {column!r} (its first line's keys: {keys}); name the key "
        "that holds the text with text_column=..."
    )


def damaged_file_error(builder: str, name: str, err: Exception, column: str | None = None) -> ValueError:
    """One clear error for a file that could not be read: the file, the line where we can find it
    (JSON lines: also a `column` that holds something other than text), and the fix."""
    where = locate_bad_json(name.split(" (row group")[0], column) if builder == "json" else None
    if where:
        return ValueError(f"{where}: fix or remove that line")
    said = " ".join(str(err).split())  # one line
    return ValueError(
        f"cannot read {builder} data file {name}: {type(err).__name__}: {said}; is it a whole, valid "
        f"{builder} file? (re-create it, or leave it out of data_files)"
    )


def located_error(source: "SourceInfo | None", err: Exception) -> Exception:
    """`err` from reading a local source as one clear error: the JSON-lines file and line that is
    damaged, else the first file; a Hub error (or an unknown source's) is returned as it is."""
    if source is None or "hub" in source.identity:
        return err  # retrying the Hub belongs to the piece reader
    names = source.piece_names or ()
    json_files = [name for name in names if name.endswith((".json", ".jsonl"))]
    column = source.identity.get("text_column")
    located = next(filter(None, (locate_bad_json(name, column) for name in json_files)), None)
    if located:
        return ValueError(f"{located}: fix or remove that line")
    return _local_error(source, first_bad_piece(source), err)


def first_bad_piece(source: "SourceInfo") -> int:
    """The first local parquet piece (file, row group) whose text column does not read; 0 if none
    fails or the pieces are not parquet row groups."""
    for piece, (path, group) in enumerate(source.local or ()):
        if group < 0:
            return 0
        try:
            parquet_file(path).read_row_group(group, columns=[source.identity["text_column"]])
        except LOCAL_READ_ERRORS:
            return piece
    return 0


def _local_error(source: "SourceInfo | None", piece: int, err: Exception) -> Exception:
    """The clear error for a piece of local data that cannot be read (the file, line or row group)."""
    if isinstance(err, ValueError) and str(err).startswith("data file "):
        return err  # already names the file and line (text_file_rows)
    names = source.piece_names if source is not None else None
    if not names or piece >= len(names):
        return err
    builder = "json" if names[piece].endswith((".json", ".jsonl")) else "parquet"
    return damaged_file_error(builder, names[piece], err, source.identity.get("text_column"))
