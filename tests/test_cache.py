"""The token cache: the same blocks as tokenizing the text, batch by batch, in every topology; damage
on disk never served; another file, tokenizer or rule never matched; a folder that cannot be written
said once and skipped."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lab2_helpers as L
from streaming_lm import cache as K
from streaming_lm import config as C
from streaming_lm import tokenize as T

BLOCK = 32
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def write_corpus(folder: Path, n_files: int = 3, text: str = "the whale and the sea") -> list[str]:
    """Parquet files of 3 row groups each: 9 pieces of whole rows, blank and empty rows among them."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        rows = [f"{text} {k} {i} " * (1 + i % 7) if i % 9 else "" for i in range(60)]
        pq.write_table(pa.table({"text": rows}), folder / f"part-{k}.parquet", row_group_size=20)
    return sorted(str(p) for p in folder.glob("*.parquet"))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def batches(files, tokenizer, cache=None, workers=0, rank=0, world_size=1, state=None, stop=None, **kwargs):
    """The batches of one pass (from `state`, up to `stop`), copied; and the loader."""
    stream = L.tokenize_stream(L.load_text_stream(data_files=files), tokenizer, cache_dir=cache)
    dataset = L.StreamingLMIterableDataset(stream, BLOCK, rank=rank, world_size=world_size, **kwargs)
    loader = L.make_dataloader(dataset, batch_size=4, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if stop is not None and len(out) == stop:
            break
    return out, loader


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def entries(folder):
    return sorted(folder.glob("*/*.json"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"workers": 2},
        {"world_size": 2},
        {"shuffle": True, "epochs": 3},
        {"shuffle": True, "workers": 2, "epochs": 2},
    ],
    ids=["in-process", "2 workers", "2 ranks", "shuffled epochs", "shuffled, 2 workers"],
)
def test_a_cached_pass_gives_the_blocks_of_the_text_batch_by_batch(
    corpus, fast_tokenizer, tmp_path, kwargs, monkeypatch
):
    cache = tmp_path / "cache"
    ranks = range(kwargs.get("world_size", 1))
    text = [batches(corpus, fast_tokenizer, rank=r, **kwargs)[0] for r in ranks]
    first = [batches(corpus, fast_tokenizer, cache, rank=r, **kwargs)[0] for r in ranks]  # fills it
    assert len(entries(cache)) >= 9  # every piece
    with monkeypatch.context() as patch:  # below no text is tokenized (forked workers inherit the patch)
        patch.setattr(T.TokenStream, "_encode", lambda *a, **k: pytest.fail("tokenized a cached piece"))
        cached = [batches(corpus, fast_tokenizer, cache, rank=r, **kwargs)[0] for r in ranks]
    for r in ranks:
        assert same(text[r], first[r]) and same(text[r], cached[r])
        assert len(text[r]) > 3


def test_a_mixture_of_cached_sources_gives_the_same_blocks(corpus, fast_tokenizer, tmp_path):
    other = write_corpus(tmp_path / "other", 1, "a ship at night")

    def mixture(cache):
        pairs = {
            n: (L.tokenize_stream(L.load_text_stream(data_files=f), fast_tokenizer, cache_dir=cache), w)
            for n, f, w in (("a", corpus, 0.7), ("b", other, 0.3))
        }
        dataset = L.StreamingLMIterableDataset(L.mix_streams(pairs, seed=1), BLOCK, shuffle=True, epochs=2)
        return [{k: v.clone() for k, v in b.items()} for b in L.make_dataloader(dataset, batch_size=4)]

    text = mixture(None)
    assert same(text, mixture(tmp_path / "cache")) and same(text, mixture(tmp_path / "cache"))


@pytest.mark.parametrize("workers_after", [2, 0], ids=["same layout", "elastic: 2 workers -> 0"])
@pytest.mark.parametrize(
    "order",
    [{"pad_last": True}, {"pad_last": True, "shuffle": True, "shuffle_window": 2}],
    ids=["in order", "shuffled"],
)
def test_a_resume_inside_a_piece_reads_from_the_cache(corpus, fast_tokenizer, tmp_path, workers_after, order):
    cache = tmp_path / "cache"
    full, _ = batches(corpus, fast_tokenizer, workers=2, **order)
    batches(corpus, fast_tokenizer, cache, workers=2, **order)  # fills the cache
    head, loader = batches(corpus, fast_tokenizer, cache, workers=2, stop=5, **order)
    state = loader.state_dict()
    assert any(s["next"] and s["next"][1] > 0 for p in state["parts"] for s in p["sources"].values())
    rest, _ = batches(corpus, fast_tokenizer, cache, workers=workers_after, state=state, **order)
    if workers_after == 2:
        assert same(head + rest, full)
    else:  # another layout: the same tokens, each once (every tail padded, none dropped)
        tokens = sorted(int(t) for b in head + rest for t in b["input_ids"][b["attention_mask"] == 1])
        assert tokens == sorted(int(t) for b in full for t in b["input_ids"][b["attention_mask"] == 1])


def damage(entry: Path, how: str, other: Path) -> None:
    tokens = entry.with_suffix(".tokens")
    if how == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-6])
    elif how == "a flipped byte":
        data = bytearray(tokens.read_bytes())
        data[len(data) // 2] ^= 0x40
        tokens.write_bytes(bytes(data))
    elif how == "the manifest of another piece":
        entry.write_text(other.read_text())
    elif how == "the manifest of another tokenizer":
        manifest = json.loads(entry.read_text())
        manifest["identity"]["tokenizer"] = "gpt2-medium, vocab 50257"
        entry.write_text(json.dumps(manifest))
    elif how == "unreadable":
        tokens.unlink()
        tokens.symlink_to(tokens.parent / "nowhere")  # a link to nothing where the tokens were
    elif how == "a manifest that is not JSON":
        entry.write_text('{"identity": ')
    elif how == "a manifest's identity key flipped":
        entry.write_text(entry.read_text().replace('"identity"', '"identitx"'))


DAMAGE = [
    "truncated",
    "a flipped byte",
    "the manifest of another piece",
    "the manifest of another tokenizer",
    "unreadable",
    "a manifest that is not JSON",
    "a manifest's identity key flipped",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_entry_is_said_once_and_its_piece_tokenized_again(
    corpus, fast_tokenizer, tmp_path, caplog, how
):
    cache = tmp_path / "cache"
    text, _ = batches(corpus, fast_tokenizer, cache)
    first, second = entries(cache)[:2]
    piece = json.loads(first.read_text())["piece"]
    damage(first, how, second)
    with caplog.at_level(logging.WARNING):
        again, _ = batches(corpus, fast_tokenizer, cache)
    said = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert same(text, again)
    assert len(said) == 1 and piece in said[0] and "tokenizing its text again" in said[0], said
    assert "identity" not in how or "its manifest has no identity" in said[0], said
    assert K.TokenCache(cache).open(json.loads(second.read_text())["identity"], "x") is not None
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert same(text, batches(corpus, fast_tokenizer, cache)[0])  # rewritten: whole again
    assert not [r for r in caplog.records if "token cache" in r.getMessage()]


def test_another_file_tokenizer_or_rule_is_never_served_from_the_cache(
    corpus, fast_tokenizer, tokenizer, tmp_path
):
    cache = tmp_path / "cache"
    batches(corpus, fast_tokenizer, cache)
    keys = set(entries(cache))
    assert len(keys) == 9
    batches(corpus, tokenizer, cache)  # the HF backend of the same bundled files: the same ids, shared
    assert set(entries(cache)) == keys
    time.sleep(0.01)
    table = pq.read_table(corpus[0])
    pq.write_table(
        table.set_column(0, "text", pa.array(["changed " + t for t in table["text"].to_pylist()])),
        corpus[0],
        row_group_size=20,
    )
    changed, _ = batches(corpus, fast_tokenizer, cache)
    assert same(changed, batches(corpus, fast_tokenizer)[0])  # the new text, not the old entries
    assert len(set(entries(cache)) - keys) == 3  # the changed file's 3 row groups, keyed anew
    stream = L.tokenize_stream(
        L.load_text_stream(data_files=corpus), fast_tokenizer, layout="wikitext", cache_dir=cache
    )
    list(L.StreamingLMIterableDataset(stream, BLOCK))
    assert len(set(entries(cache)) - keys) == 12  # another document rule: all 9 pieces keyed anew


def test_a_cache_folder_that_cannot_be_written_is_said_once_and_skipped(
    corpus, fast_tokenizer, tmp_path, caplog
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    text, _ = batches(corpus, fast_tokenizer)
    with caplog.at_level(logging.WARNING):
        got, _ = batches(corpus, fast_tokenizer, blocker / "cache")
    said = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert same(text, got) and len(said) == 1 and "cannot write" in said[0]


def test_a_full_disk_is_said_once_and_the_run_goes_on(corpus, fast_tokenizer, tmp_path, caplog, monkeypatch):
    def full(self, suffix, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(K.Writer, "_write", full)
    text, _ = batches(corpus, fast_tokenizer)
    with caplog.at_level(logging.WARNING):
        got, _ = batches(corpus, fast_tokenizer, tmp_path / "cache")
    said = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert same(text, got) and len(said) == 1 and "No space left" in said[0]
    assert not entries(tmp_path / "cache") and not list((tmp_path / "cache").rglob("*.tmp-*"))


def test_an_entry_holds_two_bytes_a_token_and_a_row_offset(corpus, fast_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    batches(corpus, fast_tokenizer, cache)
    first = entries(cache)[0]
    manifest = json.loads(first.read_text())
    assert manifest["dtype"] == "uint16" and manifest["identity"]["tokenizer"].startswith("gpt2 (bundled")
    files = {p.suffix: p.stat().st_size for p in first.parent.glob(first.stem + ".*")}
    assert files[".tokens"] == 2 * manifest["tokens"]
    assert files[".rows"] == 8 * (manifest["rows"] + 1) and files[".flags"] == manifest["rows"]
    assert np.fromfile(first.with_suffix(".rows"), np.int64)[-1] == manifest["tokens"]
    size = K.cache_size(cache)
    every = sum(p.stat().st_size for p in cache.rglob("*.*"))
    assert size["entries"] == 9 and size["bytes"] == every
    assert size["bytes_per_token"] == every / size["tokens"]


@pytest.mark.slow
def test_two_ranks_and_a_run_filling_one_cache_folder_at_once_leave_whole_entries_only(tmp_path):
    """torchrun's 2 ranks and a third process write the same pieces into one folder at the same time."""
    files = write_corpus(tmp_path / "corpus", n_files=4)  # 12 pieces, about 9,000 tokens
    train = str(C.ROOT / "scripts" / "train.py")
    cache, env = tmp_path / "cache", {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--steps", "1000", "--checkpoint-every", "1000", "--epochs", "1", "--backend", "tiktoken"]
    common += ["--block-size", "64", "--batch-size", "8", "--token-cache", str(cache), "--data-files", *files]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train]
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "env": env}
    runs = [
        subprocess.Popen([*torchrun, "--out", str(tmp_path / "ranks"), *common], **out),
        subprocess.Popen([sys.executable, train, "--out", str(tmp_path / "one"), *common], **out),
    ]
    outputs = [run.communicate(timeout=600)[0].decode() for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs[0][-3000:] + outputs[1][-3000:]
    assert not list(cache.rglob("*.tmp-*"))  # no half entry left behind
    manifests = entries(cache)
    assert len(manifests) == 12  # every piece, whole
    reader = K.TokenCache(cache)
    assert all(reader.open(json.loads(m.read_text())["identity"], m.name) is not None for m in manifests)
    assert "token cache" in outputs[1] and "12 pieces" in outputs[1]
