"""The long-documents memory row of `make benchmark` (scripts/benchmark.py imports this).

One JSON-lines file of 1 MB documents (1,000,000-character windows of the bundled book, each
starting elsewhere), 20 to 800 MB of text, read once with the defaults and tiktoken, each size in a
fresh process: the peak RSS must stay within 15 % from the smallest to the largest (issue 24).
"""

import json
import subprocess
import sys
from pathlib import Path

import lab2_helpers as L
from streaming_lm import config as C

DOC_CHARS = 1_000_000  # characters per document
SIZES_MB = (20, 100, 400, 800)  # documents per file (1 MB each)


def write_long_docs(path: Path, n_docs: int) -> str:
    """A JSON-lines file of `n_docs` documents of DOC_CHARS characters each; returns its path."""
    with open(C.ROOT / "data/source/moby_dick.jsonl") as f:
        book = "\n".join(json.loads(line)["text"] for line in f)
    book = (book + "\n") * (DOC_CHARS // len(book) + 2)  # at least one document and a shift
    with open(path, "w") as f:
        for k in range(n_docs):
            start = (k * 7_919) % (len(book) - DOC_CHARS)
            f.write(json.dumps({"text": book[start : start + DOC_CHARS]}) + "\n")
    return str(path)


def peak_rss_long(path: str, memory_kib) -> None:
    """Child process: one pass over `path` with the defaults (tiktoken); prints
    'tokens rss_before_kib peak_kib'."""
    tokens = L.tokenize_stream(L.load_text_stream(data_files=path), L.load_tokenizer(backend="tiktoken"))
    loader = L.make_dataloader(L.StreamingLMIterableDataset(tokens))
    before = memory_kib("VmRSS")
    count = sum(int(batch["attention_mask"].sum()) for batch in loader)
    print(count, before, memory_kib("VmHWM"))


def measure_long_memory(folder: Path, script: str) -> dict:
    """{MB: (tokens, RSS before MiB, peak MiB)}, each size written anew and read in a fresh process."""
    out = {}
    for mb in SIZES_MB:
        path = write_long_docs(folder / "long-docs.jsonl", mb)
        cmd = [sys.executable, script, "--rss-long", path]
        printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        tokens, before, peak = map(int, printed[-3:])
        out[mb] = (tokens, before / 1024, peak / 1024)
    Path(folder / "long-docs.jsonl").unlink()
    return out


def long_lines(memory: dict) -> list[str]:
    """The report's rows: peak RSS by size, and the target."""
    lines = ["| text | tokens | RSS before | peak | peak vs 20 MB |", "|---:|---:|---:|---:|---:|"]
    base = memory[SIZES_MB[0]][2]
    for mb, (tokens, before, peak) in memory.items():
        lines.append(
            f"| {mb} MB | {tokens / 1e6:.1f} M | {before:.0f} MiB | {peak:.0f} MiB | {peak / base - 1:+.1%} |"
        )
    growth = memory[SIZES_MB[-1]][2] / base - 1
    ok = "met" if growth <= 0.15 else "MISSED"
    return [
        *lines,
        "",
        f"- Peak RSS from {SIZES_MB[0]} to {SIZES_MB[-1]} MB within 15 %: {growth:+.1%}, {ok}",
    ]
