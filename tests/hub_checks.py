"""Checks of the Hub code path, run by tests/test_hub.py in a fresh process whose HF_ENDPOINT points
at scripts/hub_standin.py (huggingface_hub and datasets read the endpoint and the offline switches
when they are imported, so they cannot be switched inside the test process).

    HF_ENDPOINT=http://127.0.0.1:PORT python tests/hub_checks.py sources|scale|faults|configs|save|resume|goes_away

Prints one JSON object on its last line.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab2_helpers as L  # noqa: E402


def tokens_of(stream, tokenizer):
    """All token ids of a text stream, in order (one list)."""
    return [int(t) for row in L.tokenize_stream(stream, tokenizer) for t in row["input_ids"]]


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def sorted_real(batch_list):
    return sorted(t for b in batch_list for t in b["input_ids"][b["attention_mask"] == 1].tolist())


def sources(tokenizer):
    start = time.perf_counter()
    auto = L.load_text_stream("auto")
    auto_seconds = time.perf_counter() - start
    local = tokens_of(L.load_text_stream("local"), tokenizer)
    hub_stream = L.load_text_stream("hub")
    return {
        "auto_description": auto.info.description,
        "auto_seconds": auto_seconds,
        "hub_description": hub_stream.info.description,
        "hub_pieces": hub_stream.reshard().num_shards,
        "local_tokens": len(local),
        "hub_equals_local": tokens_of(hub_stream, tokenizer) == local,
        "auto_equals_local": tokens_of(auto, tokenizer) == local,
        "validation_equals_local": tokens_of(L.load_text_stream("hub", split="validation"), tokenizer)
        == tokens_of(L.load_text_stream("local", split="validation"), tokenizer),
    }


def scale(tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("hub"), tokenizer)
    corpus = sorted(int(t) for row in tokens for t in row["input_ids"])

    def loader(**kwargs):
        dataset = L.StreamingLMIterableDataset(tokens, pad_last=True, **kwargs)
        return L.make_dataloader(dataset, num_workers=2)

    two_workers = batches(loader())
    ranks = [t for r in range(3) for t in sorted_real(batches(loader(rank=r, world_size=3)))]
    full = batches(loader(shuffle=True))
    first = loader(shuffle=True)
    it = iter(first)
    head = [next(it) for _ in range(40)]
    resumed = loader(shuffle=True)
    resumed.load_state_dict(first.state_dict())
    rest = batches(resumed)
    exact = len(head) + len(rest) == len(full) and all(
        torch.equal(a[k], b[k]) for a, b in zip(head + rest, full) for k in a
    )
    return {
        "corpus_tokens": len(corpus),
        "two_workers_exact": sorted_real(two_workers) == corpus,
        "three_ranks_exact": sorted(ranks) == corpus,
        "resume_exact": exact,
    }


def faults(tokenizer):
    local = tokens_of(L.load_text_stream("local"), tokenizer)
    try:
        hub = tokens_of(L.load_text_stream("hub"), tokenizer)
    except Exception as err:  # noqa: BLE001 - reported, not hidden: the test reads it
        return {"completed": False, "error": f"{type(err).__name__}: {err}"[:500]}
    return {"completed": True, "tokens": len(hub), "expected": len(local), "equal": hub == local}


def configs(tokenizer):
    """WikiText-2 by its config name, a repository whose text is under another column, and a
    0.7 / 0.3 mixture of the two, all over the stand-in."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("streaming_lm").addHandler(handler)
    wiki2 = L.load_text_stream("hub", config="wikitext-2-raw-v1")
    rows = [r["text"] for r in wiki2]
    tokens = L.tokenize_stream(wiki2, tokenizer)
    eos = sum(int((r["input_ids"] == L.EOS_TOKEN_ID).sum()) for r in tokens)
    blocks = list(L.StreamingLMIterableDataset(tokens, pad_last=True))
    speeches = L.tokenize_stream(
        L.load_text_stream("hub", repo="lab/speeches", config=None, text_column="speech"), tokenizer
    )
    mixture = L.mix_streams({"wiki": (tokens, 0.7), "speeches": (speeches, 0.3)})
    loader = L.make_dataloader(L.StreamingLMIterableDataset(mixture, pad_last=True, epochs=None))
    L.measure_throughput(loader, max_batches=300)
    drawn = {p["source"]: p["drawn"] for p in L.progress_by_part(loader.state_dict())}
    return {
        "wiki2_description": tokens.description,
        "articles": sum(L.starts_document(r) for r in rows if r),
        "blank_rows": rows.count(""),
        "eos": eos,
        "blocks": len(blocks),
        "warnings": [r.getMessage() for r in records if r.levelname == "WARNING"],
        "speeches_description": speeches.description,
        "shares": {name: n / sum(drawn.values()) for name, n in drawn.items()},
        "pieces_named": bool(speeches.source.piece_names) and bool(tokens.source.piece_rows),
    }


def save(tokenizer):
    """Two batches of the Hub source, then its state, pickled to sys.argv[2]."""
    import pickle

    stream = L.load_text_stream("hub")
    loader = L.make_dataloader(L.StreamingLMIterableDataset(L.tokenize_stream(stream, tokenizer)))
    it = iter(loader)
    next(it), next(it)
    with open(sys.argv[2], "wb") as f:
        pickle.dump(loader.state_dict(), f)
    return {"revision": stream.source.identity["revision"]}


def resume(tokenizer):
    """The state pickled by `save`, loaded into the Hub source as the stand-in serves it now."""
    import pickle

    stream = L.load_text_stream("hub")
    loader = L.make_dataloader(L.StreamingLMIterableDataset(L.tokenize_stream(stream, tokenizer)))
    with open(sys.argv[2], "rb") as f:
        state = pickle.load(f)
    try:
        loader.load_state_dict(state)
    except ValueError as err:
        return {"revision": stream.source.identity["revision"], "refused": str(err)}
    return {"revision": stream.source.identity["revision"], "refused": None}


def goes_away(tokenizer):
    """Three batches of lab/big, then (once sys.argv[2] exists: the test killed the stand-in) the
    rest: how long until the error, and what it says."""
    import os

    tokens = L.tokenize_stream(L.load_text_stream("hub", repo="lab/big", config=None), tokenizer)
    it = iter(L.make_dataloader(L.StreamingLMIterableDataset(tokens), num_workers=int(sys.argv[3])))
    for _ in range(3):
        next(it)
    print("READY", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.1)
    start = time.perf_counter()
    try:
        for _ in it:
            pass
    except Exception as err:  # noqa: BLE001 - reported, not hidden: the test reads it
        last = str(err).strip().splitlines()[-1]  # a worker's error comes after its traceback
        return {"seconds": time.perf_counter() - start, "error": f"{type(err).__name__}: {last}"[:1500]}
    return {"seconds": time.perf_counter() - start, "error": None}


def unknown(tokenizer):
    """A repository the Hub does not have, on both sources that ask for the Hub."""
    found = {}
    for source in ("hub", "auto"):
        try:
            L.load_text_stream(source, repo="nobody/no-such-data")
            found[source] = None
        except Exception as err:  # noqa: BLE001 - reported, not hidden: the test reads it
            found[source] = f"{type(err).__name__}: {err}"
    return found


if __name__ == "__main__":
    tok = L.load_tokenizer(backend="tiktoken")
    modes = {"sources": sources, "scale": scale, "faults": faults, "configs": configs}
    modes.update(save=save, resume=resume, goes_away=goes_away, unknown=unknown)
    result = modes[sys.argv[1]](tok)
    print(json.dumps(result))
