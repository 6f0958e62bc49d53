"""The Hugging Face Hub: is it there (a probe that never waits longer than HUB_PROBE_SECONDS), the
commit a revision points to, a split's pieces from the parquet footers, set-up requests retried on
429 and 5xx, and a Hub that goes away mid-stream said at WARNING and given up after a deadline
(STREAMING_LM_HUB_DEADLINE seconds, HUB_READ_DEADLINE_SECONDS by default).
"""

import contextlib
import importlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import datasets

from .checks import check_choice
from .config import (
    DATASET_REPO,
    HUB_PROBE_SECONDS,
    HUB_READ_DEADLINE_SECONDS,
    HUB_READ_RETRY_SECONDS,
    HUB_RETRIES,
    HUB_RETRY_SECONDS,
    HUB_RETRY_STATUSES,
    OFFLINE_VALUES,
    SOURCES,
)

if TYPE_CHECKING:
    from .pieces import ReadProgress
    from .source import SourceInfo

logger = logging.getLogger(__name__)


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
        except urllib.error.HTTPError as err:  # the Hub answered, with an error
            answers.append((False, f"{url} answered {err.code} ({err.reason})"))
        except OSError as err:  # URLError, timeouts, refused connections
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
    if " answered 404 " in why:  # the Hub is there; the repository is not
        raise ValueError(
            f"no dataset repository {repo!r} on the Hub ({why}): check its name, namespace/name "
            "(e.g. Salesforce/wikitext); a private one needs a token (huggingface-cli login)"
        )
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


def _wait_for_hub(source: "SourceInfo", piece: int | None, progress: "ReadProgress", err: Exception) -> None:
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
