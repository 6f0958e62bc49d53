"""The token cache's rows of `make benchmark` (scripts/benchmark.py imports this; not run alone).

Side by side in one run, on the "wikitext rows" corpus (1.1 M tokens, 132 row groups) and
WORKER_EPOCHS epochs a pass: our pipeline reading its token cache, with 0-2 DataLoader workers,
against the tokenizer's all-core limit (tiktoken joined, on the same texts), a bare torch DataLoader
shipping the same blocks, our pre-tokenized source, the physical limit (the same uint16 tokens
sliced from one NumPy memmap into int64 batches, no pipeline) and the peer a user would pick for
re-reading tokens, LitData (`optimize` with `TokensLoader`, then `StreamingDataset` +
`StreamingDataLoader`, blocks of 256, batch 8; a benchmark-only dependency that `make benchmark`
installs). Also: the first pass (writing the cache) against an uncached pass, a 0.7 / 0.3 mixture
of cached sources against one cached source, and the peak RSS of cached passes of 1-100 epochs.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch

import lab2_helpers as L
from streaming_lm import config as C
from streaming_lm.cache import cache_size

BLOCK, BATCH = 256, 8
LIMIT = "tiktoken joined, all cores (the tokenizer's limit)"
MEMMAP = "NumPy memmap, same tokens, no pipeline"


def stream(files: list[str], tokenizer, cache) -> object:
    return L.tokenize_stream(L.load_text_stream(data_files=files), tokenizer, cache_dir=cache)


def dataset(files: list[str], tokenizer, cache, epochs: int = 1) -> L.StreamingLMIterableDataset:
    return L.StreamingLMIterableDataset(stream(files, tokenizer, cache), epochs=epochs)


def tokens_of(loader) -> int:
    return sum(int(b["attention_mask"].sum()) for b in loader)


def memmap_batches(path: Path, epochs: int) -> int:
    """The physical limit: (8, 256) int64 batches sliced from one uint16 memmap; tokens read."""
    tokens, per, count = np.memmap(path, np.uint16, "r"), BLOCK * BATCH, 0
    for _ in range(epochs):
        for start in range(0, len(tokens) - per + 1, per):
            count += torch.from_numpy(
                tokens[start : start + per].astype(np.int64).reshape(BATCH, BLOCK)
            ).numel()
    return count


def litdata_runs(rows: list[np.ndarray], folder: Path, epochs: int) -> dict:
    """{workers: run} of LitData over the same token rows (optimized once, untimed; blocks of 256,
    batch 8), or {} when it is not installed."""
    try:
        from litdata import StreamingDataLoader, StreamingDataset, TokensLoader, optimize
    except ImportError:
        return {}
    out = folder / "litdata"
    chunks = [np.concatenate(rows[i : i + 512]).astype(np.int32) for i in range(0, len(rows), 512)]
    np.save(folder / "chunks.npy", np.array(chunks, dtype=object), allow_pickle=True)
    inputs = [f"{folder / 'chunks.npy'}#{i}" for i in range(len(chunks))]
    optimize(
        fn=_litdata_item,
        inputs=inputs,
        output_dir=str(out),
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        start_method="fork",  # else it sets "spawn" for the whole process: every later worker row slows
    )

    def run(workers: int) -> int:
        data = StreamingDataset(input_dir=str(out), item_loader=TokensLoader(block_size=BLOCK))
        loaders = (StreamingDataLoader(data, batch_size=BATCH, num_workers=workers) for _ in range(epochs))
        return sum(b.numel() for loader in loaders for b in loader)

    return {n: (lambda n=n: run(n)) for n in (0, 2)}


def _litdata_item(spec: str):
    path, index = spec.rsplit("#", 1)
    yield torch.from_numpy(np.load(path, allow_pickle=True)[int(index)])


def mixture_files(folder: Path) -> list[str]:
    """10 files of about equal size (copies of the sample's two): 7 hold 70 % of the text."""
    sample = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))
    return [
        str(shutil.copy(p, folder / f"cmix-{k}-{i}.parquet")) for k in range(5) for i, p in enumerate(sample)
    ]


def measure_cache(corpora: dict, folder: Path, repeats: int, best_of, epochs: int) -> dict:
    """{"workers": {row: {n: tokens/s}}, "rates": {name: tokens/s}, "bytes_per_token": x}."""
    fast = L.load_tokenizer(backend="tiktoken")
    files, cache = corpora["wikitext rows"], folder / "token-cache"
    tokens_of(L.make_dataloader(dataset(files, fast, cache)))  # fills the cache, untimed
    rows = [r["input_ids"].astype(np.uint16) for r in stream(files, fast, None)]
    np.concatenate(rows).tofile(folder / "tokens.u16")
    blocks = list(L.group_texts_streaming(rows)) * epochs
    tokenized = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=33)
    texts = [t for f in files for t in pq.read_table(f)["text"].to_pylist() if t]
    batches = [texts[i : i + C.TOKENIZE_BATCH_ROWS] for i in range(0, len(texts), C.TOKENIZE_BATCH_ROWS)]
    runs = [((LIMIT, 0), lambda: sum(len(fast.encode_flat(b)[0]) for b in batches))]
    runs.append(((MEMMAP, 0), lambda: memmap_batches(folder / "tokens.u16", epochs)))
    bare = torch.utils.data.DataLoader(blocks, batch_size=BATCH, collate_fn=L.collate_fn)
    runs.append((("bare torch DataLoader, same blocks", 0), lambda: tokens_of(bare)))
    for n in (0, 1, 2):
        cached = dataset(files, fast, cache, epochs)
        pre = L.StreamingLMIterableDataset(tokenized, epochs=epochs)
        runs.append(
            (("ours, token cache", n), lambda d=cached, n=n: tokens_of(L.make_dataloader(d, num_workers=n)))
        )
        runs.append(
            (
                ("ours, pre-tokenized source", n),
                lambda d=pre, n=n: tokens_of(L.make_dataloader(d, num_workers=n)),
            )
        )
    runs += [(("LitData TokensLoader", n), run) for n, run in litdata_runs(rows, folder, epochs).items()]
    runs += rate_runs(files, folder, fast, cache, epochs)
    best = best_of(runs, repeats, "token cache")
    workers: dict = {}
    for key, rate in best.items():
        if isinstance(key, tuple):
            workers.setdefault(key[0], {})[key[1]] = rate
    rates = {k: v for k, v in best.items() if isinstance(k, str)}
    return {"workers": workers, "rates": rates, "bytes_per_token": cache_size(cache)["bytes_per_token"]}


def rate_runs(files: list[str], folder: Path, fast, cache: Path, epochs: int) -> list[tuple]:
    """The first pass against an uncached one, and a mixture of cached sources against one."""

    def first_pass() -> int:
        shutil.rmtree(folder / "first", ignore_errors=True)
        return tokens_of(L.make_dataloader(dataset(files, fast, folder / "first")))

    sized = mixture_files(folder)
    one = dataset(sized, fast, cache, epochs)
    pairs = {"a": (stream(sized[:7], fast, cache), 0.7), "b": (stream(sized[7:], fast, cache), 0.3)}
    mixture = L.StreamingLMIterableDataset(L.mix_streams(pairs), epochs=epochs)
    tokens_of(L.make_dataloader(one)), tokens_of(L.make_dataloader(mixture))  # fills the cache, untimed
    return [
        ("uncached pass (tiktoken)", lambda: tokens_of(L.make_dataloader(dataset(files, fast, None)))),
        ("first pass, writing the cache", first_pass),
        ("one cached source", lambda: tokens_of(L.make_dataloader(one))),
        ("0.7 / 0.3 mixture of cached sources", lambda: tokens_of(L.make_dataloader(mixture))),
    ]


def peak_rss_cached(args: list[str], memory_kib) -> None:
    """Child process (`--rss-cached EPOCHS CACHE FILES...`): a cached pass of EPOCHS epochs; prints
    'tokens rss_before_kib peak_kib'."""
    epochs, cache, files = int(args[0]), args[1], args[2:]
    loader = L.make_dataloader(dataset(files, L.load_tokenizer(backend="tiktoken"), cache, epochs))
    before = memory_kib("VmRSS")
    count = tokens_of(loader)
    print(count, before, memory_kib("VmHWM"))


def measure_cached_memory(files: list[str], folder: Path, script: str) -> dict:
    """{epochs: (tokens, RSS before MiB, peak MiB)} of cached passes, each in a fresh process."""
    out = {}
    for epochs in (1, 10, 100):  # the first fills the cache
        cmd = [sys.executable, script, "--rss-cached", str(epochs), str(folder / "rss-cache"), *files]
        printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        tokens, before, peak = map(int, printed[-3:])
        out[epochs] = (tokens, before / 1024, peak / 1024)
    return out


def cache_lines(found: dict, memory: dict) -> list[str]:
    """The report's section: the table, then each target measured against its figure."""
    w, r = found["workers"], found["rates"]
    counts = sorted({n for row in w.values() for n in row})
    lines = [
        "| pipeline | " + " | ".join(f"{n} workers" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for name, row in w.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{row[n] / 1e6:.2f} M" if n in row else "" for n in counts) + " |"
        )
    ours, pre, lit = w["ours, token cache"], w["ours, pre-tokenized source"], w.get("LitData TokensLoader")
    limit, bare, memmap = w[LIMIT][0], w["bare torch DataLoader, same blocks"][0], w[MEMMAP][0]
    first = r["first pass, writing the cache"] / r["uncached pass (tiktoken)"]
    mix = r["0.7 / 0.3 mixture of cached sources"] / r["one cached source"]
    p10, p100 = memory[10][2], memory[100][2]
    lines += [
        "",
        f"- In-process: {ours[0] / limit:.1f}x the tokenizer's all-core limit (target >= 5x: "
        f"{_verdict(ours[0] >= 5 * limit)}), {ours[0] / bare:.2f}x the bare torch DataLoader over the same "
        f"blocks (target >= 0.8x: {_verdict(ours[0] >= 0.8 * bare)}), {ours[0] / memmap:.2f} of the physical "
        "limit (the same tokens sliced from a memmap, no pipeline).",
        f"- 2 workers: {ours[2] / pre[2]:.2f}x our pre-tokenized worker path (target >= 0.8x: "
        f"{_verdict(ours[2] >= 0.8 * pre[2])}).",
        _litdata_line(ours, lit),
        f"- The first pass, writing the cache / an uncached pass: {first:.2f} (target >= 0.9: "
        f"{_verdict(first >= 0.9)}).",
        f"- A 0.7 / 0.3 mixture of cached sources / one cached source: {mix:.2f} (target >= 0.95: "
        f"{_verdict(mix >= 0.95)}).",
        f"- Peak RSS of a cached pass: {memory[1][2]:.0f} MiB for 1 epoch, {p10:.0f} MiB for 10, "
        f"{p100:.0f} MiB for 100: {100 * (p100 - p10) / p10:+.1f} % from 10 to 100 (target < 15 %: "
        f"{_verdict(p100 < 1.15 * p10)}).",
        f"- On disk: {found['bytes_per_token']:.2f} bytes a token (uint16 ids; an int64 offset and a flag "
        "byte a row; a manifest a piece).",
    ]
    return lines


def _litdata_line(ours: dict, lit: dict | None) -> str:
    if not lit:
        return "- LitData: not installed (`make benchmark` installs it)."
    ahead = ours[0] > lit[0] and ours[2] > lit[2]
    return (
        f"- Ours / LitData: in-process {ours[0] / lit[0]:.2f}x, 2 workers {ours[2] / lit[2]:.2f}x "
        f"(target ahead in both: {_verdict(ahead)})."
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"
