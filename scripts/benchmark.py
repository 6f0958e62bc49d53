"""Throughput and memory of the pipeline, side by side with the seed-style pipeline, in one run.

    .venv/bin/python scripts/benchmark.py [--repeats 3] [--out docs]

Writes docs/benchmark.md (the table, with date and machine) and docs/benchmark.png (bar chart);
takes a few minutes on 2 cores.
Every figure is the best of `--repeats` runs, all measured in this one process (except peak RSS,
measured in fresh subprocesses), so the ratios compare like with like on a noisy machine.

Corpora, both streamed from parquet with `datasets` like the real data:
- "wikitext rows": the bundled sample's train split as it is (2,810 short rows, 2 files, 33 row groups);
- "long documents": the same text with each article joined into one row (126 rows, ~2,200
  tokens each, 2 files in row groups of 8 articles);
- "whole book": the whole text as one row (~300k tokens, 1 shard): where a quadratic buffer hurts.
Pipelines:
1. the tokenizer alone on the same texts, in memory (HF fast; tiktoken): the limit;
2. the seed-style pipeline (`streaming_lm.baselines.SeedStyleDataset`): per-row iteration and
   tokenization, a Python list
   buffer cut with `buffer = buffer[block_size:]`, `torch.tensor` collate;
3. ours with the default tokenizer (HF GPT2TokenizerFast);
4. ours with the tiktoken backend, in order and shuffled (shuffle=True, default window);
5. ours in 1 and in 2 DataLoader workers, both tokenizers (the workers share the pieces; these
   runs stream the corpus 3 times over to amortize the workers' start-up);
6. the worker path: a pre-tokenized source through ours against a bare torch DataLoader shipping
   the same blocks (the ceiling), and the HF pipeline with 0, 1, 2, 4, 8 workers (up to the cores).
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # local corpora only: never wait for the Hub (not when imported)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab2_helpers as L  # noqa: E402
from streaming_lm import config as C  # noqa: E402
from streaming_lm.baselines import seed_style_loader  # noqa: E402

ROOT = C.ROOT
TOKENIZE_ROWS = C.TOKENIZE_BATCH_ROWS  # texts per tokenizer call in the raw measurement, as in the pipeline
SCALES = (1, 10, 100)  # the memory check streams each corpus this many times over
WORKER_REPEAT = 3  # the worker runs stream the corpus 3 times over


def our_loader(stream, tokenizer, num_workers=0, batch_rows=C.TOKENIZE_BATCH_ROWS, shuffle=False):
    """The lab's pipeline: tokenize_stream -> StreamingLMIterableDataset -> make_dataloader."""
    tokens = L.tokenize_stream(stream, tokenizer, batch_rows=batch_rows)
    dataset = L.StreamingLMIterableDataset(tokens, shuffle=shuffle)
    return L.make_dataloader(dataset, num_workers=num_workers)


def write_corpora(folder):
    """The three corpora as parquet files; returns {name: list of files}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = [str(f) for f in sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))]
    corpora = {"wikitext rows": sample, "long documents": [], "whole book": []}
    for k, path in enumerate(sample):
        articles, current = [], []
        for row in pq.read_table(path)["text"].to_pylist():
            if row and L.starts_document(row, "wikitext") and current:
                articles.append("".join(current))
                current = []
            current.append(row)
        articles.append("".join(current))
        corpora["long documents"].append(str(Path(folder) / f"long-{k:05d}.parquet"))
        # row groups of 8 articles: pieces enough for 8 workers, like the sample's
        pq.write_table(pa.table({"text": articles}), corpora["long documents"][-1], row_group_size=8)
    book = "".join(row for path in sample for row in pq.read_table(path)["text"].to_pylist())
    corpora["whole book"].append(str(Path(folder) / "book.parquet"))
    pq.write_table(pa.table({"text": [book]}), corpora["whole book"][-1])
    return corpora


def raw_tokenizer_tokens(tokenizer, texts):
    """Tokens of `texts`, encoded TOKENIZE_ROWS at a time with the pipeline's call."""
    total = 0
    for i in range(0, len(texts), TOKENIZE_ROWS):
        ids = tokenizer(
            texts[i : i + TOKENIZE_ROWS], add_special_tokens=False, split_special_tokens=True, verbose=False
        )
        total += sum(map(len, ids["input_ids"]))
    return total


def measure_speeds(corpora, repeats):
    """{corpus: {pipeline: best tokens/s}}, every pipeline on every corpus, in this process.

    Repeats are interleaved (run 1 of everything, then run 2, ...) so that a slow spell of the
    machine hits all pipelines alike. The DataLoader-worker runs come last: starting workers sets
    TOKENIZERS_PARALLELISM=false, which would slow the in-process HF runs after them.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    hf, fast = L.load_tokenizer(), L.load_tokenizer(backend="tiktoken")
    in_process, with_workers = [], []
    for corpus, files in corpora.items():
        texts = [t for f in files for t in pq.read_table(f)["text"].to_pylist() if t]
        stream = L.load_text_stream(data_files=files)
        longer = repeated(stream, WORKER_REPEAT)  # worker start-up (~0.2 s) amortized over 3 passes
        in_process += [
            (corpus, "tokenizer alone, HF", lambda texts=texts: raw_tokenizer_tokens(hf, texts)),
            (corpus, "tokenizer alone, tiktoken", lambda texts=texts: raw_tokenizer_tokens(fast, texts)),
            (corpus, "seed-style pipeline (HF)", lambda s=stream: tokens_through(seed_style_loader(s, hf))),
            (corpus, "ours, HF", lambda s=stream: tokens_through(our_loader(s, hf))),
            (corpus, "ours, tiktoken", lambda s=stream: tokens_through(our_loader(s, fast))),
            (
                corpus,
                "ours, tiktoken, shuffled",
                lambda s=stream: tokens_through(our_loader(s, fast, shuffle=True)),
            ),
        ]
        with_workers += [
            (
                corpus,
                f"ours, {name}, {n} worker{'s' * (n > 1)}",
                lambda s=longer, t=tok, n=n: tokens_through(our_loader(s, t, n)),
            )
            for name, tok in (("HF", hf), ("tiktoken", fast))
            for n in (1, 2)
            if corpus != "whole book"  # one row: a second worker would idle
        ]
    results = {corpus: {} for corpus in corpora}
    with tqdm(total=repeats * (len(in_process) + len(with_workers)), desc="benchmark", unit="run") as bar:
        for runs in (in_process, with_workers):
            for _ in range(repeats):
                for corpus, name, fn in runs:
                    start = time.perf_counter()
                    rate = fn() / (time.perf_counter() - start)
                    results[corpus][name] = max(rate, results[corpus].get(name, 0.0))
                    bar.update()
    return results


class BareBlocks(torch.utils.data.IterableDataset):
    """The same blocks, precomputed, dealt to DataLoader workers in turn: what a bare torch
    DataLoader costs to ship them (the worker path's ceiling)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(self.blocks[worker::workers])


def measure_worker_path(corpora, repeats):
    """{row: {workers: best tokens/s}}: a pre-tokenized source (the sample's token rows, 3 times
    over, 33 pieces) through our dataset and loader against a bare torch DataLoader shipping the
    same blocks; and the whole pipeline (HF tokenizer) on the sample with 0 to 8 workers (as many
    as there are cores)."""
    import datasets

    fast, hf = L.load_tokenizer(backend="tiktoken"), L.load_tokenizer()
    text = L.load_text_stream(data_files=corpora["wikitext rows"])
    rows = [r["input_ids"].tolist() for r in L.tokenize_stream(text, fast)] * WORKER_REPEAT
    blocks = list(L.group_texts_streaming(rows))
    tokenized = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=33)
    counts = [n for n in (0, 1, 2, 4, 8) if n <= (os.cpu_count() or 1)]
    runs = []
    for n in (0, 1, 2):
        bare = torch.utils.data.DataLoader(
            BareBlocks(blocks), batch_size=8, num_workers=n, collate_fn=L.collate_fn
        )
        runs += [("bare torch DataLoader, same blocks", n, lambda b=bare: tokens_through(b))]
        runs += [
            (
                "ours, pre-tokenized source",
                n,
                lambda n=n: tokens_through(
                    L.make_dataloader(L.StreamingLMIterableDataset(tokenized), num_workers=n)
                ),
            )
        ]
    longer = repeated(text, WORKER_REPEAT)
    runs += [
        ("ours, HF tokenizer, wikitext rows x3", n, lambda n=n: tokens_through(our_loader(longer, hf, n)))
        for n in counts
    ]
    results = {}
    for _ in range(repeats):
        for name, n, fn in runs:
            start = time.perf_counter()
            rate = fn() / (time.perf_counter() - start)
            results.setdefault(name, {})[n] = max(rate, results.get(name, {}).get(n, 0.0))
    return results


def repeated(stream, times):
    """`stream` read `times` over. datasets' repeat() returns a new stream without the row-length
    estimate load_text_stream attached, so it is carried over: tokenize_stream then sizes its
    batches as it would for a corpus that long."""
    longer = stream.repeat(times)
    longer.mean_row_chars = stream.mean_row_chars
    return longer


def tokens_through(loader):
    return L.measure_throughput(loader)["tokens"]


def memory_kib(field):
    """VmRSS (now) or VmHWM (peak) of this process in KiB. Not ru_maxrss: a child started by
    fork+exec inherits its parent's peak there, so a small child would report the parent's size."""
    return int(next(line for line in open("/proc/self/status") if line.startswith(field + ":")).split()[1])


def peak_rss_run(files, scale, batch_rows):
    """Child process: stream the corpus `scale` times through our pipeline (tiktoken);
    prints 'tokens rss_before_kib peak_kib'."""
    stream = L.load_text_stream(data_files=files)
    stream = repeated(stream, scale) if scale > 1 else stream
    loader = our_loader(stream, L.load_tokenizer(backend="tiktoken"), batch_rows=batch_rows)
    before = memory_kib("VmRSS")
    tokens = L.measure_throughput(loader)["tokens"]
    print(tokens, before, memory_kib("VmHWM"))


def measure_memory(corpora):
    """{(corpus, batch_rows): {scale: (tokens, RSS before iterating MiB, peak RSS MiB)}} for each
    of SCALES, each in a fresh process. Memory holds one batch of rows (1,000 by default), so it
    grows until the stream is longer than one batch, then stays flat: the whole book repeated 10
    times is 10 books in one batch, so that corpus also runs with batch_rows=1."""
    memory = {}
    runs = [(corpus, C.TOKENIZE_BATCH_ROWS) for corpus in corpora] + [("whole book", 1)]
    for corpus, batch_rows in runs:
        memory[corpus, batch_rows] = {}
        for scale in SCALES:
            cmd = [
                sys.executable,
                __file__,
                "--rss-run",
                str(scale),
                "--batch-rows",
                str(batch_rows),
                *corpora[corpus],
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
            tokens, before, peak = map(int, out[-3:])
            memory[corpus, batch_rows][scale] = (tokens, before / 1024, peak / 1024)
    return memory


def machine():
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    import datasets
    import tiktoken
    import transformers

    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, datasets, transformers, tiktoken))
    system = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu})"
    return f"{system}, Python {platform.python_version()}; {versions}"


def table(speeds, memory, repeats):
    """The markdown report."""
    lines = [
        f"# Benchmark: {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        f"Command: `python scripts/benchmark.py --repeats {repeats}`; "
        f"best of {repeats} runs, all in one process.",
        "",
    ]
    corpora = list(speeds)
    lines += ["| pipeline | " + " | ".join(f"{c}: tokens/s | x seed" for c in corpora) + " |"]
    lines += ["|---|" + "---:|---:|" * len(corpora)]
    for name in speeds[corpora[0]]:
        cells = []
        for c in corpora:
            rate, seed = speeds[c].get(name), speeds[c]["seed-style pipeline (HF)"]
            cells += [f"{rate:,.0f}", f"{rate / seed:.1f}x"] if rate else ["n/a (1 shard)", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ours against the tokenizer it uses (1.00 = the pipeline costs nothing beyond tokenizing):",
        "",
    ]
    for c in corpora:
        s = speeds[c]
        hf = s["ours, HF"] / s["tokenizer alone, HF"]
        tk = s["ours, tiktoken"] / s["tokenizer alone, tiktoken"]
        shuffled = s["ours, tiktoken, shuffled"] / s["ours, tiktoken"]
        line = f"- {c}: HF {hf:.2f}, tiktoken {tk:.2f}; shuffled / in order (tiktoken) {shuffled:.2f}"
        if "ours, HF, 1 worker" in s:
            line += (
                f"; 2 workers / 1 worker: HF {s['ours, HF, 2 workers'] / s['ours, HF, 1 worker']:.2f}x, "
                f"tiktoken {s['ours, tiktoken, 2 workers'] / s['ours, tiktoken, 1 worker']:.2f}x"
            )
        lines.append(line)
    lines += [
        "",
        "Peak memory (RSS, fresh process each) of our pipeline (tiktoken) streaming each corpus "
        "1, 10 and 100 times over:",
        "",
    ]
    lines += [
        "| corpus | batch_rows | RSS before iterating | peak x1 | peak x10 | peak x100 "
        "| x1 -> x10 | x10 -> x100 |"
    ]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (c, batch_rows), runs in memory.items():
        (_, before, p1), (_, _, p10), (_, _, p100) = (runs[scale] for scale in SCALES)
        lines.append(
            f"| {c} | {batch_rows} | {before:.0f} MiB | {p1:.0f} MiB | {p10:.0f} MiB | {p100:.0f} MiB | "
            f"{100 * (p10 - p1) / p1:+.1f} % | {100 * (p100 - p10) / p10:+.1f} % |"
        )
    return "\n".join(lines) + "\n"


def worker_table(workers):
    """The worker-path section of the report."""
    counts = sorted({n for row in workers.values() for n in row})
    lines = [
        "",
        "Worker path, tokens/s by number of DataLoader workers (0: in the main process), 8 x 256 batches:",
        "",
        "| pipeline | " + " | ".join(f"{n} workers" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for name, row in workers.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:,.0f}" if n in row else "" for n in counts) + " |")
    bare, ours = workers["bare torch DataLoader, same blocks"], workers["ours, pre-tokenized source"]
    lines += [
        "",
        "Ours against the bare DataLoader with the same workers: "
        + ", ".join(f"{n} workers {ours[n] / bare[n]:.2f}x" for n in (1, 2)),
    ]
    hf = workers["ours, HF tokenizer, wikitext rows x3"]
    lines += [
        "HF pipeline, workers against in-process: "
        + ", ".join(f"{n} workers {hf[n] / hf[0]:.2f}x" for n in sorted(hf) if n)
    ]
    return "\n".join(lines) + "\n"


def chart(speeds, path):
    """Grouped horizontal bars: tokens/s per pipeline, one group per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(speeds.values())))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    height = 0.8 / len(speeds)
    for k, (corpus, rates) in enumerate(speeds.items()):
        y = np.arange(len(names)) + k * height
        ax.barh(y, [rates.get(n, 0.0) / 1e6 for n in names], height, label=corpus)
    ax.set_yticks(np.arange(len(names)) + height * (len(speeds) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlabel("million tokens per second (best of runs)")
    ax.set_title(
        f"Streaming LM pipeline throughput, {datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="folder for benchmark.md and benchmark.png"
    )
    parser.add_argument("--rss-run", type=int, metavar="SCALE", help=argparse.SUPPRESS)
    parser.add_argument("--batch-rows", type=int, default=C.TOKENIZE_BATCH_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_run:
        return peak_rss_run(args.files, args.rss_run, args.batch_rows)
    with tempfile.TemporaryDirectory() as folder:
        corpora = write_corpora(folder)
        speeds = measure_speeds(corpora, args.repeats)
        workers = measure_worker_path(corpora, args.repeats)
        memory = measure_memory(corpora)
    args.out.mkdir(exist_ok=True)
    report = table(speeds, memory, args.repeats) + worker_table(workers)
    (args.out / "benchmark.md").write_text(report)
    chart(speeds, args.out / "benchmark.png")
    print(report)


if __name__ == "__main__":
    main()
