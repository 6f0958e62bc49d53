"""Checks of the Hub code path, run by tests/test_hub.py in a fresh process whose HF_ENDPOINT points
at scripts/hub_standin.py (huggingface_hub and datasets read the endpoint and the offline switches
when they are imported, so they cannot be switched inside the test process).

    HF_ENDPOINT=http://127.0.0.1:PORT python tests/hub_checks.py sources|scale|faults

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


if __name__ == "__main__":
    tok = L.load_tokenizer(backend="tiktoken")
    result = {"sources": sources, "scale": scale, "faults": faults}[sys.argv[1]](tok)
    print(json.dumps(result))
