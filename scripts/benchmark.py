"""Throughput and memory of the pipeline against the limits that matter, side by side in one run.

    .venv/bin/python scripts/benchmark.py [--repeats 3] [--out docs]   # make benchmark

Writes docs/benchmark.md (tables, the targets met or not, date, machine, command) and
docs/benchmark.png (bar chart); takes about ten minutes on 2 cores. Every speed is the best of
`--repeats` runs, the runs of all pipelines interleaved in this one process (a slow spell of a noisy
machine hits them alike); peak RSS is measured in fresh subprocesses.

Corpora (parquet, streamed like the real data):
- "wikitext rows": the bundled sample's train split 4 times over (its 33 row groups each time);
- "short rows": the same text cut like real WikiText-103 rows (60-110 tokens, headings, blank rows),
  in row groups of 1,000 rows;
- "long documents": one article per row (~2,200 tokens), row groups of 8 articles, 4 times over;
- "whole book": the whole text as one row (~280k tokens, one piece).
Targets (issue 16): in-process >= 0.85x the tokenizer's limit (the best raw call of that tokenizer
on the same texts: tiktoken's batch call, a per-row loop or one joined encode_to_numpy call; HF's
call, encode_batch or encode_batch_fast); 2 workers >= 0.85x that limit (tiktoken) and above
in-process (HF); the worker path on a pre-tokenized source >= 1.0x a bare torch DataLoader shipping
the same blocks (stretch 2x); peak RSS within 15 % from 10 to 100 epochs; an epoch over 2,000 files
within 5x the time of 500 files of the same size. And a 0.7 / 0.3 mixture within 5 % of one source.
The token cache's rows: bench_cache.py; long documents' peak RSS (20 to 800 MB): bench_long.py.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # local corpora only: never wait for the Hub (not when imported)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import cache_lines, measure_cache, measure_cached_memory, peak_rss_cached  # noqa: E402
from bench_long import long_lines, measure_long_memory, peak_rss_long  # noqa: E402

import lab2_helpers as L  # noqa: E402
from streaming_lm import config as C  # noqa: E402
from streaming_lm.baselines import seed_style_loader  # noqa: E402

ROOT = C.ROOT
COPIES = 4  # the corpora hold the sample's text this many times (~1.1 M tokens)
WORKER_EPOCHS = 3  # worker runs read 3 epochs per pass: their start-up (~0.3 s) is amortized
SCALES = (1, 10, 100)  # the memory check streams each corpus this many epochs in one pass
ROWS = C.TOKENIZE_BATCH_ROWS  # texts per raw tokenizer call, as in the pipeline
SHORT_ROW_CHARS = 420  # ~90 GPT-2 tokens: "short rows" are cut at the sentence end before this
FILES = (500, 2000)  # the many-files row: tiny JSONL files, one 40-word document each


# ----------------------------------------------------------------------------------- corpora
def sample_rows() -> list[str]:
    import pyarrow.parquet as pq

    files = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))
    return [row for f in files for row in pq.read_table(f)["text"].to_pylist()]


def articles(rows: list[str]) -> list[str]:
    """The sample's articles, one string each (its heading row opens each)."""
    out, current = [], []
    for row in rows:
        if row and L.starts_document(row, "wikitext") and current:
            out.append("".join(current))
            current = []
        current.append(row)
    return out + ["".join(current)]


def short_rows(rows: list[str]) -> list[str]:
    """Paragraph rows cut at sentence ends into rows of at most ~SHORT_ROW_CHARS characters, as real
    WikiText-103 rows (60-110 tokens); headings and blank rows kept."""
    out = []
    for row in rows:
        if not row or row.startswith(" = ") or len(row) <= SHORT_ROW_CHARS:
            out.append(row)
            continue
        current = ""
        for sentence in re.split(r"(?<= \. )", row.rstrip("\n")):
            if current and len(current) + len(sentence) > SHORT_ROW_CHARS:
                out += [current.rstrip() + " \n", ""]
                current = " "
            current += sentence.lstrip() if current == " " else sentence
        out.append(current.rstrip() + " \n")
    return out


def write_parquet(path: Path, texts: list[str], row_group_size: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)
    return str(path)


def write_corpora(folder: Path) -> dict[str, list[str]]:
    """The four corpora as parquet files; {name: files}."""
    import pyarrow.parquet as pq

    sample = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))
    rows = sample_rows()
    corpora: dict[str, list[str]] = {"wikitext rows": [], "short rows": [], "long documents": []}
    for copy in range(COPIES):
        for k, path in enumerate(sample):
            group = pq.ParquetFile(path).metadata.row_group(0).num_rows
            table = pq.read_table(path)["text"].to_pylist()
            corpora["wikitext rows"].append(write_parquet(folder / f"rows-{copy}-{k}.parquet", table, group))
        corpora["short rows"].append(write_parquet(folder / f"short-{copy}.parquet", short_rows(rows), 1000))
        corpora["long documents"].append(write_parquet(folder / f"long-{copy}.parquet", articles(rows), 8))
    corpora["whole book"] = [write_parquet(folder / "book.parquet", ["".join(rows)], 1)]
    return corpora


def write_jsonl_files(folder: Path, n: int) -> list[str]:
    """n tiny JSONL files of one 40-word document each."""
    folder.mkdir()
    words = ["the", "whale", "and", "the", "sea", "and", "the", "ship", "sailed", "on", "the", "long", "grey"]
    files = []
    for i in range(n):
        path = folder / f"doc-{i:05d}.jsonl"
        path.write_text(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(40))}) + "\n")
        files.append(str(path))
    return files


# ----------------------------------------------------------------------------------- runs
def tokens_through(loader) -> int:
    return L.measure_throughput(loader)["tokens"]


def ours(stream, tokenizer, workers=0, epochs=1, **kwargs):
    """A run of the lab's pipeline on `stream` (a load_text_stream): tokenize_stream -> dataset are
    built now (they read the files' metadata once per training run); the run times a fresh loader's
    pass (its workers' start-up included) and returns its tokens."""
    tokens = L.tokenize_stream(stream, tokenizer)
    dataset = L.StreamingLMIterableDataset(tokens, epochs=epochs, **kwargs)
    return lambda: tokens_through(L.make_dataloader(dataset, num_workers=workers))


def timed(make):
    """A run for best_of whose pipeline is built untimed: make() -> run."""
    return ("untimed set-up", make)


def raw_runs(texts: list[str], hf, fast) -> dict:
    """The tokenizers alone on `texts`, ROWS texts per call: {name: fn -> tokens}."""
    batches = [texts[i : i + ROWS] for i in range(0, len(texts), ROWS)]
    backend = hf.backend_tokenizer
    enc = fast.encoding

    def joined(batch):
        return (
            len(enc.encode_to_numpy(C.EOS_TOKEN.join(batch), allowed_special={C.EOS_TOKEN})) - len(batch) + 1
        )

    return {
        "HF call": lambda: sum(sum(map(len, hf(b, add_special_tokens=False)["input_ids"])) for b in batches),
        "HF encode_batch": lambda: sum(
            len(e.ids) for b in batches for e in backend.encode_batch(b, add_special_tokens=False)
        ),
        "HF encode_batch_fast": lambda: sum(
            len(e.ids) for b in batches for e in backend.encode_batch_fast(b, add_special_tokens=False)
        ),
        "tiktoken batch call": lambda: sum(sum(map(len, enc.encode_ordinary_batch(b))) for b in batches),
        "tiktoken per-row loop": lambda: sum(len(enc.encode_ordinary(t)) for t in texts),
        "tiktoken joined call": lambda: sum(joined(b) for b in batches),
        "tiktoken joined, all cores (ours)": lambda: sum(len(fast.encode_flat(b)[0]) for b in batches),
    }


HF_LIMIT = ("HF call", "HF encode_batch", "HF encode_batch_fast")
TIKTOKEN_LIMIT = ("tiktoken batch call", "tiktoken per-row loop", "tiktoken joined call")


def best_of(runs: list[tuple], repeats: int, label: str) -> dict:
    """{key: best tokens/s} of `runs` [(key, fn)], interleaved `repeats` times."""
    from tqdm.auto import tqdm

    best: dict = {}
    with tqdm(total=repeats * len(runs), desc=label, unit="run") as bar:
        for _ in range(repeats):
            for key, fn in runs:
                if isinstance(fn, tuple):  # (untimed set-up, make): build it, then time the run
                    fn = fn[1]()
                start = time.perf_counter()
                rate = fn() / (time.perf_counter() - start)
                best[key] = max(rate, best.get(key, 0.0))
                bar.update()
    return best


def measure_speeds(corpora: dict, repeats: int) -> dict:
    """{corpus: {pipeline: tokens/s}}: raw tokenizers, the seed-style pipeline, ours in-process
    (1 epoch, and WORKER_EPOCHS epochs next to the worker runs), ours with 1 and 2 workers."""
    import pyarrow.parquet as pq

    hf, fast = L.load_tokenizer(), L.load_tokenizer(backend="tiktoken")
    runs = []
    for corpus, files in corpora.items():
        texts = [t for f in files for t in pq.read_table(f)["text"].to_pylist() if t]
        stream = L.load_text_stream(data_files=files)
        runs += [((corpus, name), fn) for name, fn in raw_runs(texts, hf, fast).items()]
        runs += [
            ((corpus, "seed-style pipeline (HF)"), lambda s=stream: tokens_through(seed_style_loader(s, hf))),
            ((corpus, "ours, HF"), timed(lambda s=stream: ours(s, hf))),
            ((corpus, "ours, tiktoken"), timed(lambda s=stream: ours(s, fast))),
            ((corpus, "ours, tiktoken, shuffled"), timed(lambda s=stream: ours(s, fast, shuffle=True))),
        ]
        if corpus == "whole book":  # one piece: a second worker would idle
            continue
        for name, tok in (("HF", hf), ("tiktoken", fast)):
            key = (corpus, f"ours, {name}, {WORKER_EPOCHS} epochs")
            runs.append((key, timed(lambda s=stream, t=tok: ours(s, t, 0, WORKER_EPOCHS))))
            for n in (1, 2):
                key = (corpus, f"ours, {name}, {n} worker{'s' * (n > 1)}, {WORKER_EPOCHS} epochs")
                runs.append((key, timed(lambda s=stream, t=tok, n=n: ours(s, t, n, WORKER_EPOCHS))))
    best = best_of(runs, repeats, "speeds")
    out: dict = {corpus: {} for corpus in corpora}
    for (corpus, name), rate in best.items():
        out[corpus][name] = rate
    return out


class BareBlocks(torch.utils.data.IterableDataset):
    """The same blocks, precomputed, dealt to DataLoader workers in turn: what a bare torch
    DataLoader costs to ship them (the worker path's ceiling)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(self.blocks[worker::workers])


def measure_worker_path(corpora: dict, repeats: int) -> dict:
    """{row: {workers: tokens/s}}: a pre-tokenized source (the sample's token rows, 4 times over, 33
    pieces; WORKER_EPOCHS epochs a pass) through our dataset and loader against a bare torch
    DataLoader shipping the same blocks (our collate_fn), ours shipping 1 batch per transfer, and
    the whole pipeline with 0-8 workers."""
    import datasets

    fast, hf = L.load_tokenizer(backend="tiktoken"), L.load_tokenizer()
    text = L.tokenize_stream(L.load_text_stream(data_files=corpora["wikitext rows"]), fast)
    rows = [r["input_ids"].tolist() for r in text]
    blocks = list(L.group_texts_streaming(rows)) * WORKER_EPOCHS  # the same blocks, epoch after epoch
    tokenized = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=33)
    runs = []
    for n in (0, 1, 2):
        bare = torch.utils.data.DataLoader(
            BareBlocks(blocks), batch_size=8, num_workers=n, collate_fn=L.collate_fn
        )
        runs.append((("bare torch DataLoader, same blocks", n), lambda b=bare: tokens_through(b)))
        for per, name in (
            (C.TRANSFER_BATCHES, "ours, pre-tokenized source"),
            (1, "ours, pre-tokenized, 1 batch a transfer"),
        ):
            if n == 0 and per == 1:
                continue

            def run(n=n, per=per):
                dataset = L.StreamingLMIterableDataset(tokenized, epochs=WORKER_EPOCHS)
                return tokens_through(L.make_dataloader(dataset, num_workers=n, transfer_batches=per))

            runs.append(((name, n), run))
    stream = L.load_text_stream(data_files=corpora["wikitext rows"])
    for n in (0, 1, 2, 4, 8):
        for name, tok in (("HF", hf), ("tiktoken", fast)):
            key = (f"ours, {name}, wikitext rows, {WORKER_EPOCHS} epochs", n)
            runs.append((key, timed(lambda n=n, t=tok: ours(stream, t, n, WORKER_EPOCHS))))
    best = best_of(runs, repeats, "worker path")
    out: dict = {}
    for (name, n), rate in best.items():
        out.setdefault(name, {})[n] = rate
    return out


def measure_files(folder: Path, repeats: int) -> dict:
    """{n files: best seconds per epoch} (tiktoken, in-process), and the tokens read."""
    fast = L.load_tokenizer(backend="tiktoken")
    sets = {n: write_jsonl_files(folder / f"files-{n}", n) for n in FILES}
    out = {}
    for _ in range(repeats):
        for n, files in sets.items():
            start = time.perf_counter()  # the whole set-up timed too: it must be linear in the files
            tokens = ours(L.load_text_stream(data_files=files), fast, pad_last=True)()
            seconds = time.perf_counter() - start
            out[n] = (min(seconds, out.get(n, (1e9,))[0]), tokens)
    return out


def measure_mixture(corpora: dict, repeats: int) -> dict:
    """{name: tokens/s}: the same blocks as one source and as a 0.7 / 0.3 mixture of two sources
    holding 70 % and 30 % of them (WORKER_EPOCHS epochs a pass, tiktoken in-process, and
    pre-tokenized rows), and {"first batch, NAME": best seconds to the first batch of a pass}."""
    import shutil

    import datasets

    fast = L.load_tokenizer(backend="tiktoken")
    files = corpora["wikitext rows"]
    rows = [r["input_ids"].tolist() for r in L.tokenize_stream(L.load_text_stream(data_files=files), fast)]
    cut = len(rows) * 7 // 10

    def pre(part, shards):
        return datasets.Dataset.from_dict({"input_ids": part}).to_iterable_dataset(num_shards=shards)

    def text(part):
        return L.tokenize_stream(L.load_text_stream(data_files=part), fast)

    folder = Path(files[0]).parent
    sample = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))
    sized = []  # 10 files of about equal size (copies of the sample's two): 7 hold 70 % of the text
    for k in range(5):
        for i, path in enumerate(sample):
            sized.append(str(shutil.copy(path, folder / f"mix-{k}-{i}.parquet")))
    streams = {
        "one source, tiktoken": text(sized),
        "0.7 / 0.3 mixture, tiktoken": L.mix_streams(
            {"a": (text(sized[:7]), 0.7), "b": (text(sized[7:]), 0.3)}
        ),
        "one source, pre-tokenized": pre(rows, 33),
        "0.7 / 0.3 mixture, pre-tokenized": L.mix_streams(
            {"a": (pre(rows[:cut], 23), 0.7), "b": (pre(rows[cut:], 10), 0.3)}
        ),
    }
    datasets_ = {name: L.StreamingLMIterableDataset(s, epochs=WORKER_EPOCHS) for name, s in streams.items()}
    runs = [(name, lambda d=d: tokens_through(L.make_dataloader(d))) for name, d in datasets_.items()]
    speeds = best_of(runs, repeats, "mixture")
    for name in ("one source, tiktoken", "0.7 / 0.3 mixture, tiktoken"):
        speeds[f"first batch, {name}"] = min(first_batch_seconds(datasets_[name]) for _ in range(repeats))
    return speeds


def first_batch_seconds(dataset) -> float:
    """Seconds from a fresh loader to its first batch."""
    start = time.perf_counter()
    next(iter(L.make_dataloader(dataset)))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- memory
def memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB. Not ru_maxrss: a child started by
    fork+exec inherits its parent's peak there, so a small child would report the parent's size."""
    return int(next(line for line in open("/proc/self/status") if line.startswith(field + ":")).split()[1])


def peak_rss_run(files: list[str], epochs: int) -> None:
    """Child process: stream the corpus `epochs` times in one pass (tiktoken); prints
    'tokens rss_before_kib peak_kib'."""
    tokens = L.tokenize_stream(L.load_text_stream(data_files=files), L.load_tokenizer(backend="tiktoken"))
    loader = L.make_dataloader(L.StreamingLMIterableDataset(tokens, epochs=epochs))
    before = memory_kib("VmRSS")
    count = tokens_through(loader)
    print(count, before, memory_kib("VmHWM"))


def measure_memory(corpora: dict) -> dict:
    """{corpus: {scale: (tokens, RSS before MiB, peak MiB)}}, each run in a fresh process, on one
    copy of each corpus (the whole book: once)."""
    memory = {}
    for corpus, files in corpora.items():
        base = files[: max(1, len(files) // COPIES)]
        memory[corpus] = {}
        for scale in SCALES:
            cmd = [sys.executable, __file__, "--rss-run", str(scale), *base]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
            tokens, before, peak = map(int, out[-3:])
            memory[corpus][scale] = (tokens, before / 1024, peak / 1024)
    return memory


# ----------------------------------------------------------------------------------- report
def machine() -> str:
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    import datasets
    import tiktoken
    import tokenizers
    import transformers

    mods = (torch, datasets, transformers, tokenizers, tiktoken)
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in mods)
    system = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu})"
    return f"{system}, Python {platform.python_version()}; {versions}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def speed_table(speeds: dict) -> list[str]:
    corpora = list(speeds)
    names = list(dict.fromkeys(n for c in corpora for n in speeds[c]))
    lines = ["| pipeline | " + " | ".join(corpora) + " |", "|---|" + "---:|" * len(corpora)]
    for name in names:
        cells = [f"{speeds[c][name] / 1e6:.2f} M" if name in speeds[c] else "n/a (1 piece)" for c in corpora]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def target_lines(speeds: dict) -> list[str]:
    """Targets 1 and 2, per corpus."""
    lines = []
    for corpus, s in speeds.items():
        hf_limit = max(s[k] for k in HF_LIMIT)
        tk_limit = max(s[k] for k in TIKTOKEN_LIMIT)
        hf, tk = s["ours, HF"] / hf_limit, s["ours, tiktoken"] / tk_limit
        line = (
            f"- {corpus}: in-process / limit: HF {hf:.2f}, tiktoken {tk:.2f} (target >= 0.85: "
            f"{verdict(min(hf, tk) >= 0.85)}); tiktoken / its joined call on all cores "
            f"{s['ours, tiktoken'] / s['tiktoken joined, all cores (ours)']:.2f}; shuffled / in order "
            f"{s['ours, tiktoken, shuffled'] / s['ours, tiktoken']:.2f}"
        )
        two = f"ours, tiktoken, 2 workers, {WORKER_EPOCHS} epochs"
        if two in s:
            tk2 = s[two] / tk_limit
            hf2 = s[f"ours, HF, 2 workers, {WORKER_EPOCHS} epochs"] / s[f"ours, HF, {WORKER_EPOCHS} epochs"]
            line += (
                f"; 2 workers: tiktoken / limit {tk2:.2f} (target >= 0.85: {verdict(tk2 >= 0.85)}), "
                f"HF / HF in-process {hf2:.2f} (target > 1: {verdict(hf2 > 1)})"
            )
        lines.append(line)
    return lines


def worker_lines(workers: dict) -> list[str]:
    counts = sorted({n for row in workers.values() for n in row})
    lines = [
        "| pipeline | " + " | ".join(f"{n} workers" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for name, row in workers.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{row[n] / 1e6:.2f} M" if n in row else "" for n in counts) + " |"
        )
    bare, mine = workers["bare torch DataLoader, same blocks"], workers["ours, pre-tokenized source"]
    one = workers["ours, pre-tokenized, 1 batch a transfer"]
    ratios = {n: mine[n] / bare[n] for n in (1, 2)}
    lines += [
        "",
        "- Worker path, ours / bare torch DataLoader: "
        + ", ".join(f"{n} worker{'s' * (n > 1)} {r:.2f}x" for n, r in ratios.items())
        + f" (target >= 1.0: {verdict(min(ratios.values()) >= 1.0)};"
        + f" stretch 2x: {verdict(min(ratios.values()) >= 2.0)});"
        + " shipping 8 batches a transfer / 1: "
        + ", ".join(f"{n} worker{'s' * (n > 1)} {mine[n] / one[n]:.2f}x" for n in (1, 2)),
    ]
    for name in (k for k in workers if k.startswith("ours, ") and "wikitext rows" in k):
        row = workers[name]
        lines.append(
            f"- {name}: "
            + ", ".join(f"{n} workers {row[n] / row[0]:.2f}x in-process" for n in sorted(row) if n)
        )
    return lines


def memory_lines(memory: dict) -> list[str]:
    lines = [
        "| corpus | RSS before | peak, 1 epoch | 10 epochs | 100 epochs | 1 -> 10 | 10 -> 100 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    flat = True
    for corpus, runs in memory.items():
        (_, before, p1), (_, _, p10), (_, _, p100) = (runs[s] for s in SCALES)
        growth = 100 * (p100 - p10) / p10
        flat = flat and growth < 15
        lines.append(
            f"| {corpus} | {before:.0f} MiB | {p1:.0f} MiB | {p10:.0f} MiB | {p100:.0f} MiB | "
            f"{100 * (p10 - p1) / p1:+.1f} % | {growth:+.1f} % |"
        )
    return lines + ["", f"- Peak RSS from 10 to 100 epochs within 15 % on every corpus: {verdict(flat)}"]


def report(speeds, workers, files, mixture, memory, repeats) -> str:
    (n1, (s1, t1)), (n2, (s2, t2)) = sorted(files.items())
    mix_text = mixture["0.7 / 0.3 mixture, tiktoken"] / mixture["one source, tiktoken"]
    mix_pre = mixture["0.7 / 0.3 mixture, pre-tokenized"] / mixture["one source, pre-tokenized"]
    lines = [
        f"# Benchmark: {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        f"Command: `python scripts/benchmark.py --repeats {repeats}`: tokens per second, the best of "
        f"{repeats} "
        "runs, all pipelines' runs interleaved in one process (M = million).",
        "",
        "## In-process and 1-2 DataLoader workers",
        "",
        *speed_table(speeds),
        "",
        "Ours against its tokenizer's limit (the best raw call of that tokenizer on the same texts):",
        "",
        *target_lines(speeds),
        "",
        "## The worker path, and scaling with workers",
        "",
        *worker_lines(workers),
        "",
        "## Many files, mixtures",
        "",
        f"- An epoch over {n1} tiny JSONL files ({t1:,} tokens): {s1:.2f} s; over {n2} ({t2:,} tokens): "
        f"{s2:.2f} s: {s2 / s1:.1f}x for {n2 / n1:.0f}x the files "
        f"(target within 5x: {verdict(s2 / s1 <= 5)}).",
        f"- A 0.7 / 0.3 mixture against one source, the same blocks, {WORKER_EPOCHS} epochs a pass: tiktoken "
        f"text {mix_text:.2f}x, pre-tokenized {mix_pre:.2f}x (target overhead <= 5 %: "
        f"{verdict(min(mix_text, mix_pre) >= 0.95)}). Time to the first batch: one source "
        f"{mixture['first batch, one source, tiktoken']:.3f} s, the mixture "
        f"{mixture['first batch, 0.7 / 0.3 mixture, tiktoken']:.3f} s (every source tokenizes its first "
        "token groups before the first draw).",
        "",
        "## Peak memory (RSS, a fresh process each; tiktoken; one copy of each corpus, N epochs in one pass)",
        "",
        *memory_lines(memory),
    ]
    return "\n".join(lines) + "\n"


def chart(speeds: dict, path: Path) -> None:
    """Grouped horizontal bars: tokens/s per pipeline, one group per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in next(iter(speeds.values())) if "epochs" not in n]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    height = 0.8 / len(speeds)
    for k, (corpus, rates) in enumerate(speeds.items()):
        y = np.arange(len(names)) + k * height
        ax.barh(y, [rates.get(n, 0.0) / 1e6 for n in names], height, label=corpus)
    ax.set_yticks(np.arange(len(names)) + height * (len(speeds) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlabel("million tokens per second (best of runs, in-process)")
    ax.set_title(f"Streaming LM pipeline, {datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def quiet_repeated_warnings() -> None:
    """Hundreds of runs would each repeat the same two notes on stderr: say them once, then silence
    them (DataLoader workers are forked and inherit both settings)."""
    print(
        "note: every run drops its parts' final tokens short of a block (pad_last=False, the WARNING "
        "is off here), and the 4 and 8 worker rows start more workers than cores on purpose",
        file=sys.stderr,
    )
    logging.getLogger("streaming_lm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="folder for benchmark.md and benchmark.png"
    )
    parser.add_argument("--rss-run", type=int, metavar="EPOCHS", help=argparse.SUPPRESS)
    parser.add_argument("--rss-cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-long", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_run:
        return peak_rss_run(args.files, args.rss_run)
    if args.rss_cached:
        return peak_rss_cached(args.files, memory_kib)
    if args.rss_long:
        return peak_rss_long(args.files[0], memory_kib)
    quiet_repeated_warnings()
    with tempfile.TemporaryDirectory() as folder:
        corpora = write_corpora(Path(folder))
        speeds = measure_speeds(corpora, args.repeats)
        workers = measure_worker_path(corpora, args.repeats)
        files = measure_files(Path(folder), args.repeats)
        mixture = measure_mixture(corpora, args.repeats)
        memory = measure_memory(corpora)
        cached = measure_cache(corpora, Path(folder), args.repeats, best_of, WORKER_EPOCHS)
        one_copy = corpora["wikitext rows"][: len(corpora["wikitext rows"]) // COPIES]
        cached_memory = measure_cached_memory(one_copy, Path(folder), __file__)
        long_memory = measure_long_memory(Path(folder), __file__)
    args.out.mkdir(exist_ok=True)
    text = report(speeds, workers, files, mixture, memory, args.repeats)
    text += "\n## Token cache (cache.py)\n\n" + "\n".join(cache_lines(cached, cached_memory)) + "\n"
    text += "\n## Long documents (1 MB each, one JSON-lines file, a fresh process each)\n\n"
    text += "\n".join(long_lines(long_memory)) + "\n"
    (args.out / "benchmark.md").write_text(text)
    chart(speeds, args.out / "benchmark.png")
    print(text)


if __name__ == "__main__":
    main()
