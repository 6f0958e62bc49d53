"""The checkpoint: one envelope, versioned, verified. `dataset.state_dict()` and
`loader.state_dict()` return it; `load_state_dict()` refuses anything else with a ValueError that
names what is wrong. Schema, version 2 (plain Python values: it pickles, torch.saves with
weights_only=True, and dumps to JSON):

    {
      "format": "streaming_lm.data_state",
      "version": 2,
      "settings": {                        # what a resume must match (else refused, naming the field)
        "block_size", "pad_last", "shuffle", "seed", "shuffle_window", "epochs", "vocab_size",
        "pad_token_id",                    # reading.Settings
        "sources": {NAME: {"identity": {   # one per source ("main", or a mixture's names)
            "source": {"files": "2 files #ab12..", "split": "train", ...} or
                      {"hub": REPO, "config", "split", "revision": COMMIT},
            "tokenizer", "layout", "separate_documents"}, "pieces": N}},
        "mixture": None or {"weights": {NAME: w}, "on_exhausted": "repeat" | "stop", "seed": S},
      },
      "layout": {"world_size": R, "num_workers": W, "ranks": [the ranks whose parts are here]},
      "pass": {"start": FIRST EPOCH, "end": EPOCH AFTER THE LAST (None: endless)},
      "loader": {"batch_size": B, "next_worker": w, "finished": bool} (a loader's state only),
      "parts": [                           # one per (rank, worker) of `ranks` x `num_workers`
        {"rank": r, "worker": w,
         "sources": {NAME: PartState},     # parts.PartState.to_dict(): where this part is
         "mix": {"chosen": n, "key": [..]} # a mixture's draws so far (mixing.py)
        }, ...],
      "digests": {"envelope": HEX, "r0w1": {"NAME.FIELD": HEX, ..., "mix": HEX}}
    }

A PartState (parts.py) holds: "epoch"; "cursor" and "next" (the task of its plan and the position
[piece, row, token] of the first token not yet emitted; inside a shuffle window, where the window
began); "window" ({"start", "end", "emitted"}: the open shuffle window); "pending" (windows of an
earlier layout still to finish, with the tasks they read); "plans" (its plans for epochs where the
default does not hold, after an elastic resume: tasks [piece, row, token, step, offset]);
"blocks", "tokens" (emitted this epoch), "dropped" (tail tokens dropped this pass),
"last_epoch", "ended". No tokens are stored: a resume re-reads from the positions.

May change between save and resume: world_size (give every rank the gathered state of all ranks:
`gather_states`), num_workers, batch_size and the other DataLoader settings. May not: anything
under "settings" (block size, shuffling, epochs, the source's files or commit, tokenizer, document
rule). Digests, computed at save, turn any later edit or truncation into an error naming the part
and field.
"""

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from .checks import is_int

FORMAT = "streaming_lm.data_state"
VERSION = 2
MAY_CHANGE = "world_size (with the state of every rank), num_workers, batch_size, DataLoader settings"
PART_FIELDS = (
    "epoch",
    "cursor",
    "next",
    "window",
    "pending",
    "plans",
    "blocks",
    "tokens",
    "dropped",
    "last_epoch",
    "ended",
)


def part_key(rank: int, worker: int) -> str:
    return f"r{rank}w{worker}"


def digest(value: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of `value`."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _envelope_digest(state: dict) -> str:
    keys = ["format", "version", "settings", "layout", "pass", "loader"]
    parts = [part_key(p["rank"], p["worker"]) for p in state["parts"]]
    return digest([{k: state.get(k) for k in keys}, parts])


def _part_digests(part: dict) -> dict[str, str]:
    out = {f"{name}.{f}": digest(s.get(f)) for name, s in part["sources"].items() for f in PART_FIELDS}
    out["mix"] = digest(part.get("mix"))
    return out


def seal(
    settings: dict, layout: dict, pass_: dict, parts: list[dict], loader: dict | None = None
) -> dict[str, Any]:
    """The envelope around `parts` (each {"rank", "worker", "sources": {name: PartState dict},
    "mix"}), with its digests."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "layout": layout,
        "pass": pass_,
        "parts": parts,
    }
    if loader is not None:
        state["loader"] = loader
    state["digests"] = {"envelope": _envelope_digest(state)}
    for part in parts:
        state["digests"][part_key(part["rank"], part["worker"])] = _part_digests(part)
    return state


def open_state(state: Any) -> dict:
    """`state` if it is a whole, unedited envelope of this version, else ValueError saying what it is."""
    if not isinstance(state, dict) or not state:
        kind = "an empty dict" if state == {} else type(state).__name__
        raise ValueError(
            f"not a streaming_lm checkpoint: got {kind}. Pass what dataset.state_dict() or "
            "loader.state_dict() returned (an empty state does not mean 'start over': build a fresh loader)"
        )
    if state.get("format") != FORMAT:
        raise ValueError(_foreign(state))
    if state.get("version") != VERSION:
        raise ValueError(
            f"this checkpoint has format version {state.get('version')!r}; "
            f"this code reads version {VERSION}: "
            "resume it with the code that saved it, or start the epoch afresh"
        )
    _check_shape(state)
    digests = state["digests"]
    if digests.get("envelope") != _envelope_digest(state):
        raise ValueError(
            "corrupt checkpoint: its settings, layout or list of parts changed after it was saved"
        )
    for part in state["parts"]:
        key = part_key(part["rank"], part["worker"])
        saved = digests.get(key)
        if not isinstance(saved, dict):
            raise ValueError(f"corrupt checkpoint: part {key} has no digests")
        for field, value in _part_digests(part).items():
            if saved.get(field) != value:
                raise ValueError(
                    f"corrupt checkpoint: part {key}, field {field}: it does not match its digest "
                    "(edited or damaged after it was saved)"
                )
    return state


def _foreign(state: dict) -> str:
    """What a dict that is not our envelope looks like, for the error."""
    keys = sorted(map(str, state))[:8]
    old = {"cursor", "carry", "skip"} & set(state) or "_snapshot" in state or "dataset_state" in state
    if old:
        return (
            f"this checkpoint is in the unversioned format of streaming_lm before version {VERSION} (keys "
            f"{keys}); this code reads version {VERSION} only: resume it with the older code, or start the "
            "epoch afresh"
        )
    return (
        f"not a streaming_lm checkpoint: no 'format': {FORMAT!r} (its keys: {keys}); "
        "is it a model's or optimizer's state?"
    )


def _check_shape(state: dict) -> None:
    """ValueError naming the first field whose type or range no save could have produced."""
    for name, kind in (
        ("settings", dict),
        ("layout", dict),
        ("pass", dict),
        ("parts", list),
        ("digests", dict),
    ):
        if not isinstance(state.get(name), kind):
            raise ValueError(
                f"corrupt checkpoint: {name} must be a {kind.__name__}, got {state.get(name)!r:.80}"
            )
    layout = state["layout"]
    for name in ("world_size", "num_workers"):
        if not is_int(layout.get(name)) or layout[name] < 1:
            raise ValueError(
                f"corrupt checkpoint: layout.{name} must be a positive int, got {layout.get(name)!r}"
            )
    ranks = layout.get("ranks")
    if (
        not isinstance(ranks, list)
        or not ranks
        or any(not is_int(r) or not 0 <= r < layout["world_size"] for r in ranks)
    ):
        raise ValueError(
            f"corrupt checkpoint: layout.ranks must list ranks below world_size, got {ranks!r:.80}"
        )
    expected = {(r, w) for r in ranks for w in range(layout["num_workers"])}
    found = []
    for i, part in enumerate(state["parts"]):
        if not isinstance(part, dict) or not is_int(part.get("rank")) or not is_int(part.get("worker")):
            raise ValueError(
                f"corrupt checkpoint: parts[{i}] must hold an int rank and worker, got {part!r:.80}"
            )
        if not isinstance(part.get("sources"), dict) or not part["sources"]:
            raise ValueError(
                f"corrupt checkpoint: part {part_key(part['rank'], part['worker'])} has no sources"
            )
        found.append((part["rank"], part["worker"]))
    if len(set(found)) != len(found) or set(found) != expected:
        missing = sorted(expected - set(found))
        extra = sorted(set(found) - expected)
        twice = sorted({k for k in found if found.count(k) > 1})
        raise ValueError(
            "corrupt checkpoint: the parts must be every (rank, worker) of the layout once; "
            f"missing {missing}, unexpected {extra}, twice {twice}"
        )
    for part in state["parts"]:
        for name, value in part["sources"].items():
            _check_part(value, f"part {part_key(part['rank'], part['worker'])} source {name}")


def _ints(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(is_int(v) and v >= 0 for v in value)


def _check_part(value: Any, where: str) -> None:
    """ValueError naming the field of a PartState dict with a wrong type or range."""
    if not isinstance(value, dict):
        raise ValueError(f"corrupt checkpoint: {where} must be a dict, got {value!r:.80}")
    missing = [f for f in PART_FIELDS if f not in value]
    if missing:
        raise ValueError(f"corrupt checkpoint: {where} is missing {missing}")
    for name in ("epoch", "cursor", "blocks", "tokens", "dropped"):
        if not is_int(value[name]) or value[name] < 0:
            raise ValueError(
                f"corrupt checkpoint: {where}, {name} must be a non-negative int, got {value[name]!r:.80}"
            )
    if not isinstance(value["ended"], bool):
        raise ValueError(
            f"corrupt checkpoint: {where}, ended must be True or False, got {value['ended']!r:.80}"
        )
    if value["next"] is not None and not _ints(value["next"], 3):
        raise ValueError(
            f"corrupt checkpoint: {where}, next must be [piece, row, token], got {value['next']!r:.80}"
        )
    windows = ([value["window"]] if value["window"] is not None else []) + list(
        _as_list(value["pending"], where)
    )
    for window in windows:
        _check_window(window, where)
    for plan in _as_list(value["plans"], where):
        if (
            not isinstance(plan, dict)
            or not is_int(plan.get("epoch"))
            or not isinstance(plan.get("tasks"), list)
        ):
            raise ValueError(
                f"corrupt checkpoint: {where}, a plan must hold an epoch and tasks, got {plan!r:.80}"
            )
        list(_tasks(plan["tasks"], where))
        for window in plan.get("pending", []):
            _check_window(window, where)


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"corrupt checkpoint: {where}: expected a list, got {value!r:.80}")
    return value


def _tasks(tasks: Any, where: str) -> Iterator[list]:
    for task in _as_list(tasks, where):
        if not _ints(task, 5) or task[3] < 1 or task[4] >= task[3]:
            raise ValueError(
                f"corrupt checkpoint: {where}, a task must be [piece, row, token, step, offset], "
                f"got {task!r:.80}"
            )
        yield task


def _check_window(window: Any, where: str) -> None:
    if not isinstance(window, dict) or not _ints(window.get("start"), 3):
        raise ValueError(
            f"corrupt checkpoint: {where}, a window must start at [piece, row, token], got {window!r:.80}"
        )
    if window.get("end") is not None and not _ints(window["end"], 3):
        raise ValueError(
            f"corrupt checkpoint: {where}, a window's end must be a position or None, "
            f"got {window['end']!r:.80}"
        )
    if not is_int(window.get("emitted")) or window["emitted"] < 0:
        raise ValueError(
            f"corrupt checkpoint: {where}, window.emitted must be a non-negative int, "
            f"got {window.get('emitted')!r}"
        )
    list(_tasks(window.get("tasks", []), where))


def gather_states(states: list[dict]) -> dict:
    """One envelope holding the parts of every rank, from the envelopes each rank saved (e.g. the
    list torch.distributed.all_gather_object returns): what a resume on another world size needs."""
    first = open_state(states[0])
    parts, ranks = [], []
    for state in map(open_state, states):
        for name in ("settings", "pass"):
            if state[name] != first[name]:
                raise ValueError(f"the ranks' states differ in {name}: they were not saved by one run")
        parts += state["parts"]
        ranks += state["layout"]["ranks"]
    layout = {**first["layout"], "ranks": sorted(set(ranks))}
    loader = first.get("loader")
    return seal(
        first["settings"],
        layout,
        first["pass"],
        sorted(parts, key=lambda p: (p["rank"], p["worker"])),
        loader,
    )
