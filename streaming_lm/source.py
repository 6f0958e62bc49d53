"""Step 1, the source: a lazy stream of text rows from the Hugging Face Hub or from local files.

    stream = load_text_stream("auto")   # WikiText-103 from the Hub if it answers within 5 s, else the sample

"auto" never waits on a dead network for long: the probe runs in a daemon thread and gives up after
HUB_PROBE_SECONDS. Asking for the Hub explicitly ("hub") fails within those seconds when it cannot
be reached, instead of silently reading something else.
"""

import glob
import hashlib
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow

from .checks import check_choice
from .config import (
    DATASET_CONFIG,
    DATASET_REPO,
    DATASET_SPLIT,
    HUB_PROBE_SECONDS,
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
)

logger = logging.getLogger(__name__)

DataFiles = str | Path | Sequence[str | Path]


def offline_switch() -> str | None:
    """The name of the offline variable that is set (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").lower() in OFFLINE_VALUES:
            return name
    return None


def hub_status(timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """(reachable, why): whether the Hub answers for the WikiText dataset within `timeout` seconds.

    Not reachable at once when an offline switch is set. The request runs in a daemon thread, so
    even a hanging DNS lookup cannot hold the caller longer than `timeout`.
    """
    switch = offline_switch()
    if switch:
        return False, f"{switch} is set"
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/datasets/{DATASET_REPO}"
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


def choose_source(source: str = "auto") -> tuple[str, str]:
    """(source, why): `source` resolved to "hub" or "local".

    "auto" probes the Hub (<= 5 s) and falls back to "local", saying why at WARNING. "hub" raises
    ConnectionError within those seconds if the Hub cannot be reached.
    """
    check_choice("source", source, SOURCES)
    if source == "local":
        return "local", "asked for"
    reachable, why = hub_status()
    if source == "hub" and not reachable:
        raise ConnectionError(
            f"source='hub' but the Hub cannot be reached ({why}); use source='local' or 'auto'"
        )
    if not reachable:
        logger.warning("auto: the Hub is not reachable (%s): streaming the bundled sample instead", why)
        return "local", f"auto fell back: {why}"
    return "hub", "asked for" if source == "hub" else "auto: the Hub answered"


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


def load_hub_split(split: str) -> datasets.IterableDataset:
    """wikitext-103-v1's `split` from the Hub, streaming. Answers 429 or 5xx while it is set up
    (reading the card and the file list) are retried HUB_RETRIES times with doubling waits, each
    said at WARNING; the file reads while streaming are retried by huggingface_hub itself."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(HUB_RETRIES + 1):
        try:
            return datasets.load_dataset(DATASET_REPO, DATASET_CONFIG, split=split, streaming=True)
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status not in HUB_RETRY_STATUSES or attempt == HUB_RETRIES:
                raise
            wait = HUB_RETRY_SECONDS * 2**attempt
            logger.warning(
                "the Hub answered %s: retry %d of %d in %g s", status, attempt + 1, HUB_RETRIES, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


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
    row), text and JSON lines from the first MiB of the first file. tokenize_stream uses it to keep
    a tokenizing batch near TOKENIZE_BATCH_CHARS however long the documents are."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        metas = [pq.ParquetFile(f).metadata for f in files]
        rows = sum(m.num_rows for m in metas)
        size = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
        return size / max(rows, 1)
    with open(files[0], "rb") as f:
        head = f.read(SAMPLE_BYTES)
    return len(head) / max(head.count(b"\n"), 1)


def parquet_piece_weights(files: Sequence[str]) -> list[int]:
    """Uncompressed bytes of every row group, file by file: the pieces `reshard()` makes of them,
    in its order, so that ranks and workers can be given about equal shares (parts.py)."""
    import pyarrow.parquet as pq

    weights = []
    for name in files:
        meta = pq.ParquetFile(name).metadata
        weights += [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    return weights


def local_data_files(
    data_files: DataFiles | None = None, split: str = DATASET_SPLIT
) -> tuple[str, list[str]]:
    """(builder, paths): the bundled sample's parquet files of `split`, or the user's files checked.

    builder is the `datasets` builder for the files' type: "text", "json" or "parquet".
    """
    if data_files is None:
        files = sorted(SAMPLE_DIR.glob(SAMPLE_FILES.format(split=split)))
        if not files:
            splits = sorted({f.name.split("-")[0] for f in SAMPLE_DIR.glob(SAMPLE_FILES.format(split="*"))})
            raise ValueError(f"the bundled sample has the splits {splits}, got split={split!r}")
        return "parquet", [str(f) for f in files]
    patterns = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    files = [str(path) for pattern in map(str, patterns) for path in _expand(pattern)]
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    builders = {LOCAL_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data_files must all be one of {sorted(LOCAL_BUILDERS)}, got suffixes {suffixes}")
    return builders.pop(), files


def load_text_stream(
    source: str = "auto", *, data_files: DataFiles | None = None, split: str = DATASET_SPLIT
) -> datasets.IterableDataset:
    """Step 1: a lazy `datasets.IterableDataset` of rows with a `text` column.

    source: "hub" streams wikitext-103-v1 from the Hugging Face Hub; "local" streams the bundled
    sample (or `data_files`: .txt one row per line with its "\\n" kept, .json/.jsonl/.parquet with
    a `text` field); "auto" picks the Hub when it answers within 5 s, else local.
    The choice and why are in `stream.info.description` (e.g. "local: data/wikitext_sample, 2 files").
    """
    if data_files is not None and source == "auto":
        source, why = "local", "data_files given"
    else:
        source, why = choose_source(source)
    if data_files is not None and source == "hub":
        raise ValueError("data_files are local files: use source='local' (or 'auto') with them")
    if source == "hub":
        stream = load_hub_split(split)
        stream.info.description = f"hub: {DATASET_REPO} {DATASET_CONFIG} ({split})"
        stream.provenance = {"source": stream.info.description}  # what a checkpoint must match
        return stream
    builder, files = local_data_files(data_files, split)
    options = {"keep_linebreaks": True} if builder == "text" else {}  # WikiText rows keep their "\n"
    try:
        stream = datasets.load_dataset(
            builder, data_files={split: files}, split=split, streaming=True, **options
        )
    except (pyarrow.ArrowInvalid, StopIteration) as err:  # a file datasets cannot read: name it
        raise ValueError(
            f"cannot read {builder} data files {files[:3]}: {type(err).__name__} {err}"
        ) from None
    if stream.column_names is not None and TEXT_COLUMN not in stream.column_names:
        raise ValueError(f"no {TEXT_COLUMN!r} column in {files[0]}; its columns are {stream.column_names}")
    if data_files is None:  # laid out like wikitext-103-v1: tokenize_stream's "auto" layout reads this
        stream.info.config_name = DATASET_CONFIG
    where = os.path.relpath(SAMPLE_DIR, ROOT) if data_files is None else ", ".join(files[:3])
    note = "" if why in ("asked for", "data_files given") else f" ({why})"
    stream.info.description = f"local: {where}, {len(files)} file{'s' * (len(files) > 1)}{note}"
    stream.provenance = {"source": f"local ({split})", "files": fingerprint(files)}
    stream.mean_row_chars = mean_row_chars(builder, files)
    if builder == "parquet":
        stream.piece_weights = parquet_piece_weights(files)
    return stream
