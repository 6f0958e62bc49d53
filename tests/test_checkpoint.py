"""The checkpoint: one versioned envelope, verified before a token is read, elastic across workers
and ranks, and persistent workers that move on to the next epoch (by token accounting)."""

import copy
import pickle

import pytest
import torch

import lab2_helpers as L
from conftest import real_tokens_in_order, real_tokens_sorted, row_tokens_sorted, unique_token_stream
from streaming_lm import config as C
from streaming_lm import state as S

BLOCK = 16
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def dataset(stream, **kwargs):
    settings = {"pad_last": True, "shuffle_window": 8, "seed": 3, **kwargs}
    return L.StreamingLMIterableDataset(stream, BLOCK, **settings)


def saved_after(stream, k, num_workers=2, **kwargs):
    """A loader's state after k batches of 4 blocks."""
    loader = L.make_dataloader(dataset(stream, **kwargs), batch_size=4, num_workers=num_workers)
    it = iter(loader)
    for _ in range(k):
        next(it)
    return loader.state_dict()


def reseal(state):
    """`state` with its digests computed again: what a buggy writer or a forger would hand over, so
    that the checks of the content itself are tested too."""
    return S.seal(state)


def part(state, worker=1):
    return next(p for p in state["parts"] if p["worker"] == worker)["sources"]["main"]


def edit(field, value, worker=1, **more):
    def apply(state):
        part(state, worker).update({field: value, **more})
        return state

    return apply


def swap_workers(state):
    """Workers 0 and 1 exchange their positions, each with its digests: what moving files between
    folders of per-worker states would do."""
    a, b = state["parts"]
    a["sources"], b["sources"] = b["sources"], a["sources"]
    da, db = state["digests"]["parts"]
    da["sources"], db["sources"] = db["sources"], da["sources"]
    return state


# damage that keeps the digests as saved: refused by the digests or the envelope's shape
UNSEALED = [
    (
        "a position moved by one piece",
        edit("next", [0, 0, 0]),
        r"parts\[1\]\.sources\.main\.next: it does not match its digest",
    ),
    ("blocks edited", edit("blocks", 1), r"parts\[1\]\.sources\.main\.blocks: it does not match"),
    (
        "a worker's state set to None",
        lambda s: {**s, "parts": [{**p, "sources": None} if p["worker"] == 1 else p for p in s["parts"]]},
        r"parts\[1\]\.sources: it does not match",
    ),
    ("ended set to a string", edit("ended", "yes"), r"parts\[1\]\.sources\.main\.ended: it does not match"),
    (
        "a part left out",
        lambda s: {**s, "parts": s["parts"][:1]},
        r"parts: 1 entries, but it was saved with 2",
    ),
    (
        "a part twice",
        lambda s: {**s, "parts": s["parts"] + s["parts"][:1]},
        r"parts: 3 entries, but it was saved with 2",
    ),
    (
        "the settings edited",
        lambda s: {**s, "settings": {**s["settings"], "seed": 4}},
        r"settings\.seed: it does not match",
    ),
    (
        "a part's rank edited",
        lambda s: {**s, "parts": [{**p, "rank": 1} for p in s["parts"]]},
        r"parts\[0\]\.rank",
    ),
    (
        "a part's worker deleted",
        lambda s: {**s, "parts": [{k: v for k, v in p.items() if k != "worker"} for p in s["parts"]]},
        r"parts\[0\]\.worker",
    ),
    (
        "two workers swapped with their digests",
        swap_workers,
        r"parts\[0\]\.sources\.main\.\w+: it does not match",
    ),
    ("next not a position", edit("next", "piece 3"), r"parts\[1\]\.sources\.main\.next"),
    ("an empty state", lambda s: {}, r"got an empty dict.*does not mean 'start over'"),
    (
        "a model's state dict",
        lambda s: torch.nn.Linear(2, 2).state_dict(),
        r"no 'format'.*\['bias', 'weight'\].*model's",
    ),
    (
        "the unversioned format of an old round",
        lambda s: {"cursor": {}, "carry": [], "skip": 0},
        r"unversioned format.*before version 2.*reads version 3",
    ),
    ("a newer format version", lambda s: {**s, "version": 4}, r"format version 4; this code reads version 3"),
    ("not a dict at all", lambda s: [s], r"not a streaming_lm checkpoint: got list"),
]

# damage with the digests computed again: refused by the checks of the content against the plan
RESEALED = [
    (
        "a piece the stream does not have",
        edit("next", [99, 0, 0], window=None),
        r"parts\[1\]\.sources\.main\.next: expected a piece below 6, got 99",
    ),
    (
        "a position outside its task",
        edit("next", [5, 0, 0], worker=0),
        r"parts\[0\]\.sources\.main\.next: expected a place in task \d+ of its plan",
    ),
    (
        "a cursor past its plan",
        edit("cursor", 50),
        r"cursor: expected at most the \d+ tasks of its plan, got 50",
    ),
    (
        "a window that emitted more than it holds",
        lambda s: _window(s, 9),
        r"window\.emitted: expected in 1\.\.shuffle_window=8, got 9",
    ),
    ("an epoch outside the pass", edit("epoch", 5), r"epoch: expected in the pass \[0, 1\], got 5"),
    (
        "more tokens than blocks can hold",
        edit("tokens", 10**6),
        r"tokens: expected at most blocks x block_size",
    ),
    (
        "a rank the layout does not have",
        lambda s: {**s, "layout": {**s["layout"], "ranks": [3]}},
        r"layout\.ranks: expected distinct ranks below world_size=1",
    ),
    (
        "a field no save writes",
        lambda s: {**s, "layout": {**s["layout"], "shards": 2}},
        r"layout\.shards: not a field of Layout",
    ),
    ("a field left out", lambda s: _drop(s, "cursor"), r"parts\[1\]\.sources\.main\.cursor: missing"),
]


def _window(state, emitted):
    window = part(state)["window"]
    assert window is not None, "the test needs a state inside a shuffle window"
    window["emitted"] = emitted
    return state


def _drop(state, field):
    del part(state)[field]
    return state


@pytest.mark.parametrize("what, damage, match", UNSEALED, ids=[d[0] for d in UNSEALED])
def test_damaged_states_are_refused_naming_what_is_wrong(what, damage, match):
    stream, _ = unique_token_stream()
    state = saved_after(stream, 3, shuffle=True)
    fresh = L.make_dataloader(dataset(stream, shuffle=True), batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(damage(copy.deepcopy(state)))


@pytest.mark.parametrize("what, damage, match", RESEALED, ids=[d[0] for d in RESEALED])
def test_damaged_states_with_fresh_digests_are_refused_by_their_content(what, damage, match):
    stream, _ = unique_token_stream()
    state = saved_after(stream, 3, shuffle=True)
    fresh = L.make_dataloader(dataset(stream, shuffle=True), batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(reseal(damage(copy.deepcopy(state))))


def test_a_row_past_the_end_of_its_piece_is_refused_before_reading(fast_tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("local"), fast_tokenizer)
    first = L.StreamingLMIterableDataset(tokens)
    next(iter(first))
    state = first.state_dict()
    piece = state["parts"][0]["sources"]["main"]["next"][0]
    state["parts"][0]["sources"]["main"]["next"] = [piece, 10_000, 0]  # parquet metadata: ~90 rows
    with pytest.raises(ValueError, match=rf"next: expected a row of piece {piece} \(\d+ rows\), got 10000"):
        L.StreamingLMIterableDataset(tokens).load_state_dict(reseal(state))


def test_a_token_past_the_end_of_its_row_is_refused_when_read():
    stream, _ = unique_token_stream()
    first = dataset(stream)
    next(iter(first))
    state = first.state_dict()
    state["parts"][0]["sources"]["main"]["next"][2] = 999  # rows hold at most 40 tokens
    resumed = dataset(stream)
    resumed.load_state_dict(reseal(state))
    with pytest.raises(
        ValueError, match=r"corrupt checkpoint: position token=999, but row \d+ of piece 0 has \d+ tokens"
    ):
        next(iter(resumed))


def test_a_checkpoint_roundtrips_through_torch_save_with_weights_only(tmp_path):
    stream, _ = unique_token_stream()
    state = saved_after(stream, 3, shuffle=True)
    torch.save(state, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == state


# ----------------------------------------------------------------------------- persistent workers
@pytest.mark.parametrize("shuffle", [False, True])
def test_persistent_workers_move_on_to_the_next_epoch_and_resume_exactly(shuffle):
    stream, rows = unique_token_stream()

    def reference(epoch):
        d = dataset(stream, shuffle=shuffle)
        d.set_epoch(epoch)
        return real_tokens_in_order(L.make_dataloader(d, batch_size=4, num_workers=2))

    loader = L.make_dataloader(
        dataset(stream, shuffle=shuffle), batch_size=4, num_workers=2, persistent_workers=True
    )
    epochs = [real_tokens_in_order(list(loader)) for _ in range(3)]
    for e, tokens in enumerate(epochs):
        assert sorted(tokens) == row_tokens_sorted(rows)  # exactly once per epoch
        assert tokens == reference(e)  # epoch e, not epoch 0 again
    if shuffle:
        assert len({tuple(t) for t in epochs}) == 3
    loader.dataset.set_epoch(7)
    assert real_tokens_in_order(list(loader)) == reference(7)
    it = iter(loader)  # epoch 8, with the same persistent workers
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    resumed = L.make_dataloader(
        dataset(stream, shuffle=shuffle), batch_size=4, num_workers=2, persistent_workers=True
    )
    resumed.load_state_dict(state)
    assert real_tokens_in_order(head + list(resumed)) == reference(8)


# ----------------------------------------------------------------------------- elastic resume
def read(make, ranks, workers, state=None, stop=None):
    """Batches read by `ranks` in-process ranks with `workers` workers each (every rank loads
    `state`), each rank stopping after `stop` batches (None: its pass's end); and each rank's state."""
    batches, states = [], []
    for rank in range(ranks):
        loader = L.make_dataloader(make(rank=rank, world_size=ranks), batch_size=4, num_workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        for _ in range(stop) if stop is not None else iter(int, 1):
            batch = next(it, None)
            if batch is None:
                break
            batches.append(batch)
        states.append(loader.state_dict())
    return batches, states


@pytest.mark.parametrize(
    "before, after",
    [((1, 2), (1, 0)), ((1, 0), (1, 3)), ((2, 1), (3, 1)), ((3, 1), (2, 1)), ((2, 2), (3, 0))],
    ids=["2->0 workers", "0->3 workers", "2->3 ranks", "3->2 ranks", "2x2->3x0"],
)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop", [1, 3, 6])  # inside the first window or piece, later, across an epoch
def test_elastic_resume_reads_every_token_once_per_epoch(before, after, shuffle, stop):
    stream, rows = unique_token_stream()

    def make(**kwargs):
        return dataset(stream, shuffle=shuffle, epochs=2, **kwargs)

    head, states = read(make, *before, stop=stop)
    state = L.gather_states(states)
    assert state["layout"]["ranks"] == list(range(before[0]))
    rest, _ = read(make, *after, state=pickle.loads(pickle.dumps(state)))
    assert real_tokens_sorted(head + rest) == sorted(row_tokens_sorted(rows) * 2)  # 2 epochs, each once
    assert len(real_tokens_sorted(rest)) > 0


def test_elastic_resume_across_an_epoch_boundary_keeps_each_epoch_whole():
    """A state saved when one part is in epoch 2 and another still in epoch 1."""
    stream, rows = unique_token_stream()

    def make(**kwargs):
        return dataset(stream, shuffle=True, epochs=3, **kwargs)

    head, states = read(make, 1, 2, stop=12)  # ~13 batches an epoch with 2 workers
    parts = states[0]["parts"]
    epochs = {p["sources"]["main"]["epoch"] for p in parts}
    rest, _ = read(make, 2, 1, state=L.gather_states(states))
    assert real_tokens_sorted(head + rest) == sorted(row_tokens_sorted(rows) * 3)
    assert epochs  # the parts' epochs when saved (the test holds whatever they were)


def test_a_rank_alone_cannot_take_over_other_ranks_pieces():
    stream, _ = unique_token_stream()
    _, states = read(lambda **k: dataset(stream, **k), 2, 1, stop=2)
    with pytest.raises(ValueError, match=r"holds the parts of rank\(s\) \[0\] of 2.*gather_states"):
        L.make_dataloader(dataset(stream, rank=0, world_size=3), batch_size=4).load_state_dict(states[0])


def test_the_state_stays_small_after_an_elastic_resume(fast_tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("local"), fast_tokenizer)

    def make(**kwargs):
        return L.StreamingLMIterableDataset(tokens, shuffle=True, shuffle_window=4096, epochs=None, **kwargs)

    _, states = read(make, 1, 2, stop=30)
    loader = L.make_dataloader(make(), num_workers=3)
    loader.load_state_dict(states[0])
    it = iter(loader)
    for _ in range(10):
        next(it)
    state = loader.state_dict()
    assert any(p["sources"]["main"]["plans"] for p in state["parts"])  # the re-planned epoch is in it
    size = len(pickle.dumps(state))
    assert size < 100_000 * 3, f"{size:,} bytes"


def test_the_readme_shows_the_schema_of_the_dataclasses():
    """The README's schema block is what the dataclasses of state.py print: it cannot drift."""
    readme = (C.ROOT / "README.md").read_text()
    block = "\n".join(line.rstrip() for line in S.schema().splitlines())
    start = readme.index("  format: 'streaming_lm.data_state'")
    end = readme.index("  ```", start)
    shown = "\n".join(line.removeprefix("  ").rstrip() for line in readme[start:end].splitlines())
    assert shown == block, "README.md's schema differs from state.schema(): paste the new one in"
