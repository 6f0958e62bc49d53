"""This checkout's pipeline against another git revision's, side by side in one process.

    .venv/bin/python scripts/bench_against.py REV [--repeats 3]

`git archive REV` unpacks that revision's package, lab2_helpers.py and data/ into a temporary
folder under other names (streaming_lm_rev, lab2_helpers_rev; the package imports itself
relatively), so both versions run in this one process, their runs interleaved: a slow spell of a
noisy machine hits them alike. The rows are benchmark.py's pipeline rows on its corpora: ours with
HF and tiktoken in-process, shuffled, WORKER_EPOCHS epochs with 0-2 DataLoader workers; a
pre-tokenized source with 0-2 workers; a 0.7 / 0.3 mixture of two tiktoken sources. Prints each
row's best tokens/s for REV and for this checkout, their ratio, and the rows slower by more than
5 % (the rule for a refactoring: no row slower by more than 5 %).
"""

import argparse
import importlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as B  # noqa: E402

ROOT = B.ROOT
SLOWER = 0.95  # a row below this ratio (this checkout / REV) is reported


def unpack(rev: str, folder: Path):
    """REV's lab2_helpers.py, its package and data/ under `folder`, imported as lab2_helpers_rev."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "streaming_lm", "lab2_helpers.py", "data"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "streaming_lm").rename(folder / "streaming_lm_rev")
    helpers = (folder / "lab2_helpers.py").read_text().replace("from streaming_lm.", "from streaming_lm_rev.")
    (folder / "lab2_helpers_rev.py").write_text(helpers)
    sys.path.insert(0, str(folder))
    return importlib.import_module("lab2_helpers_rev")


def tokens_of(loader) -> int:
    """Real tokens (attention_mask sum) of a loader's pass."""
    return sum(int(batch["attention_mask"].sum()) for batch in loader)


def runs(L, corpora: dict, pre_rows: list, label: str) -> list[tuple]:
    """[((row, label), (untimed set-up, make))] of version L on `corpora`, as benchmark.py builds them."""
    import datasets

    hf, fast = L.load_tokenizer(), L.load_tokenizer(backend="tiktoken")

    def ours(files, tok, workers=0, epochs=1, **kwargs):
        def make():
            dataset = L.StreamingLMIterableDataset(
                L.tokenize_stream(L.load_text_stream(data_files=files), tok), epochs=epochs, **kwargs
            )
            return lambda: tokens_of(L.make_dataloader(dataset, num_workers=workers))

        return ("untimed set-up", make)

    def pre(rows, shards):
        return datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=shards)

    def pre_run(workers):
        def make():
            dataset = L.StreamingLMIterableDataset(pre(pre_rows, 33), epochs=B.WORKER_EPOCHS)
            return lambda: tokens_of(L.make_dataloader(dataset, num_workers=workers))

        return ("untimed set-up", make)

    def mixture():
        files = corpora["wikitext rows"]
        text = [
            L.tokenize_stream(L.load_text_stream(data_files=f), fast) for f in (files[:6], files[6:])
        ]  # 75 % and 25 % of the text
        dataset = L.StreamingLMIterableDataset(
            L.mix_streams({"a": (text[0], 0.7), "b": (text[1], 0.3)}), epochs=B.WORKER_EPOCHS
        )
        return lambda: tokens_of(L.make_dataloader(dataset))

    out = []
    for corpus, files in corpora.items():
        for name, tok in (("HF", hf), ("tiktoken", fast)):
            out.append(((f"{corpus}: ours, {name}", label), ours(files, tok)))
        out.append(((f"{corpus}: ours, tiktoken, shuffled", label), ours(files, fast, shuffle=True)))
        if corpus == "whole book":  # one piece: a second worker would idle
            continue
        for name, tok in (("HF", hf), ("tiktoken", fast)):
            for n in (0, 1, 2):
                row = f"{corpus}: ours, {name}, {n} workers, {B.WORKER_EPOCHS} epochs"
                out.append(((row, label), ours(files, tok, n, B.WORKER_EPOCHS)))
    for n in (0, 1, 2):
        out.append(((f"pre-tokenized source, {n} workers", label), pre_run(n)))
    out.append(
        ((f"0.7 / 0.3 mixture, tiktoken, {B.WORKER_EPOCHS} epochs", label), ("untimed set-up", mixture))
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare against (a commit, tag or branch)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    args = parser.parse_args()
    B.quiet_repeated_warnings()
    logging.getLogger("streaming_lm").setLevel(logging.ERROR)
    logging.getLogger("streaming_lm_rev").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lab2_helpers as L

    with tempfile.TemporaryDirectory() as folder:
        old = unpack(args.rev, Path(folder) / "rev")
        corpora = B.write_corpora(Path(folder))
        fast = L.load_tokenizer(backend="tiktoken")
        stream = L.tokenize_stream(L.load_text_stream(data_files=corpora["wikitext rows"]), fast)
        pre_rows = [r["input_ids"].tolist() for r in stream]
        pairs = [
            p
            for both in zip(runs(old, corpora, pre_rows, args.rev), runs(L, corpora, pre_rows, "HEAD"))
            for p in both
        ]
        best = B.best_of(pairs, args.repeats, f"{args.rev} vs this checkout")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(
        f"\nBest of {args.repeats}, tokens/s (M), interleaved in one process; "
        f"this checkout: {head.stdout.strip()}"
    )
    print(f"| row | {args.rev} | this checkout | ratio |\n|---|---:|---:|---:|")
    slower = []
    for row in dict.fromkeys(r for r, _ in best):
        a, b = best[(row, args.rev)], best[(row, "HEAD")]
        print(f"| {row} | {a / 1e6:.2f} | {b / 1e6:.2f} | {b / a:.2f} |")
        slower += [row] * (b / a < SLOWER)
    print(f"\nRows slower by more than {1 - SLOWER:.0%}: {', '.join(slower) or 'none'}")


if __name__ == "__main__":
    main()
