"""Checking a checkpoint before resuming from it: a state saved with other settings, from other
files, or with a corrupt field is refused with a ValueError that names the field.

A dataset state is what `StreamingLMIterableDataset.state_dict()` returns; a loader state is what
torchdata's StatefulDataLoader returns (it holds one dataset state per worker).
"""

from collections.abc import Iterator
from typing import Any

from .checks import is_int

POSITION_KEYS = ("epoch", "end_epoch", "cursor", "carry", "blocks", "tokens", "skip", "dropped", "last_epoch")


def _mismatches(saved: Any, ours: Any, path: str) -> Iterator[str]:
    """Dotted names of the fields where `saved` and `ours` differ (recursing into dicts)."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours), key=str):
            yield from _mismatches(saved.get(key), ours.get(key), f"{path}.{key}")
    elif saved != ours:
        yield path


def check_config(state: dict, config: dict) -> None:
    """ValueError naming each setting (or source field: files, tokenizer, layout ...) that differs."""
    wrong = [name for key in config for name in _mismatches(state[key], config[key], key)]
    if not wrong:
        return
    lines = []
    for name in wrong:
        saved, ours = state, config
        for key in name.split("."):
            saved, ours = (saved or {}).get(key), (ours or {}).get(key)
        lines.append(f"{name}: saved {saved!r}, now {ours!r}")
    raise ValueError(
        "this checkpoint cannot resume this dataset; it was saved with other settings or data:\n  "
        + "\n  ".join(lines)
        + "\nbuild the dataset and DataLoader as they were when it was saved"
    )


def _check_count(name: str, value: Any) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"corrupt checkpoint: {name} must be a non-negative int, got {value!r:.80}")


def _check_stream_state(value: Any, path: str = "cursor.stream") -> None:
    """A datasets state of one piece: every shard index must be 0 or 1 (the piece has one shard)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("shard_idx", "shard_example_idx", "batch_idx") and not (is_int(item) and item >= 0):
                raise ValueError(f"corrupt checkpoint: {path}.{key} must be a non-negative int, got {item!r}")
            if key == "shard_idx" and item > 1:
                raise ValueError(f"corrupt checkpoint: {path}.shard_idx={item}, but a piece has one shard")
            _check_stream_state(item, f"{path}.{key}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"corrupt checkpoint: {path} is a {type(value).__name__}")


def check_position(state: dict, config: dict, vocab_size: int) -> None:
    """ValueError naming the first field that no uninterrupted run could have produced."""
    for name in ("epoch", "blocks", "tokens", "skip", "dropped"):
        _check_count(name, state[name])
    end = state["end_epoch"]
    if end is not None and (not is_int(end) or end < state["epoch"]):
        raise ValueError(f"corrupt checkpoint: end_epoch={end!r} is before epoch={state['epoch']}")
    if state["skip"] > config["shuffle_window"]:
        raise ValueError(
            f"corrupt checkpoint: skip={state['skip']} > shuffle_window={config['shuffle_window']}"
        )
    cursor = state["cursor"]
    if not isinstance(cursor, dict) or set(cursor) != {"piece", "stream", "row", "batch"}:
        raise ValueError(
            f"corrupt checkpoint: cursor must hold piece, stream, row and batch, got {cursor!r:.80}"
        )
    _check_count("cursor.batch", cursor["batch"])
    _check_count("cursor.row", cursor["row"])
    _check_count("cursor.piece", cursor["piece"])
    if cursor["piece"] > config["pieces"]:
        raise ValueError(
            f"corrupt checkpoint: cursor.piece={cursor['piece']}, but the stream has {config['pieces']}"
        )
    _check_stream_state(cursor["stream"])
    carry = state["carry"]
    if not isinstance(carry, list) or not all(is_int(t) and 0 <= t < vocab_size for t in carry):
        bad = next((t for t in carry if not (is_int(t) and 0 <= t < vocab_size)), carry)
        raise ValueError(
            f"corrupt checkpoint: carry must be token ids in [0, {vocab_size}), found {bad!r:.80}"
        )


def check_state(state: Any, config: dict, vocab_size: int) -> dict:
    """`state` if it can resume a dataset built with `config`, else ValueError naming the field."""
    if not isinstance(state, dict):
        raise ValueError(f"not a StreamingLMIterableDataset state dict: got {type(state).__name__}")
    missing = [key for key in (*config, *POSITION_KEYS) if key not in state]
    if missing:
        raise ValueError(f"not a StreamingLMIterableDataset state dict: missing {missing}")
    check_config(state, config)
    check_position(state, config, vocab_size)
    return state


def saved_num_workers(loader_state: dict) -> int | None:
    """The num_workers a StatefulDataLoader state was saved with (None if it is not one)."""
    if "dataset_state" in loader_state or "fetcher_state" in loader_state:
        return 0
    snapshot = loader_state.get("_snapshot")
    if isinstance(snapshot, dict) and isinstance(snapshot.get("_worker_snapshots"), dict):
        return len(snapshot["_worker_snapshots"])
    return None
