"""Exactly-once across ranks and workers, checked in a real distributed run (gloo backend, CPU).

    torchrun --standalone --nproc_per_node=3 scripts/check_distributed.py [--num-workers 2] [--even-steps]

Every rank builds the same pipeline (stream -> tokenize -> StreamingLMIterableDataset, which takes
its rank and world size from torch.distributed -> DataLoader) and reads its part to the end with
pad_last=True (with --even-steps doing one all_reduce per step, as DDP does). The tokenizer counts
the characters it is given (in every worker), so the run shows that each rank tokenizes only its
own share. Then the
ranks all_gather their figures and all_reduce a histogram of their real tokens over the GPT-2
vocabulary; rank 0 compares it with one pass over the whole stream in a single process.

Without --even-steps the run passes when the histograms are equal (no token lost, none twice) and
no rank is empty. With --even-steps every rank must take the same number of steps, and the tokens
read equal the stream's minus those counted as not yielded. One line per rank, then OK or FAILED
(exit 1). The bundled sample has 2 parquet files of 33 row groups: every rank and worker is busy.
"""

import argparse
import multiprocessing
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lab2_helpers as L  # noqa: E402
from streaming_lm import config as C  # noqa: E402

VOCAB = C.GPT2_VOCAB_SIZE


class CountingTokenizer:
    """Wraps a tokenizer and counts the characters it tokenizes, across forked DataLoader workers."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, multiprocessing.Value("q", 0)
        self.eos_token_id, self.name_or_path = tokenizer.eos_token_id, tokenizer.name_or_path
        self.vocab_size = tokenizer.vocab_size

    def __call__(self, texts, **kwargs):
        with self.chars.get_lock():
            self.chars.value += sum(map(len, texts))
        return self.tokenizer(texts, **kwargs)


def read_part(loader, collective_per_step):
    """(VOCAB,) int64 counts of the real tokens of every batch, and the batch count. With
    `collective_per_step`, one all_reduce per step as DDP's gradient sync does: a rank that runs out
    early would leave its partners waiting forever, unless the loader keeps the ranks in step."""
    counts, batches = torch.zeros(VOCAB, dtype=torch.int64), 0
    for batch in loader:
        counts += torch.bincount(batch["input_ids"][batch["attention_mask"] == 1], minlength=VOCAB)
        batches += 1
        if collective_per_step:
            dist.all_reduce(torch.ones(1))
    return counts, batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--source", default="local", choices=C.SOURCES)
    parser.add_argument("--backend", default="hf", choices=C.TOKENIZER_BACKENDS)
    parser.add_argument("--even-steps", action="store_true", help="make_dataloader(even_steps=True)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer = CountingTokenizer(L.load_tokenizer(backend=args.backend))
    tokens = L.tokenize_stream(L.load_text_stream(args.source), tokenizer)
    dataset = L.StreamingLMIterableDataset(tokens, pad_last=True)  # rank, world_size from torch.distributed
    assert (dataset.rank, dataset.world_size) == (rank, world_size)
    loader = L.make_dataloader(dataset, num_workers=args.num_workers, even_steps=args.even_steps)
    start = time.perf_counter()
    counts, batches = read_part(loader, collective_per_step=args.even_steps)
    seconds = time.perf_counter() - start
    busy = sum(part["blocks"] > 0 for part in L.progress_by_part(loader.state_dict()))
    not_yielded = loader.not_yielded["tokens"]

    mine = torch.tensor(
        [int(counts.sum()), batches, tokenizer.chars.value, busy, not_yielded, int(seconds * 1000)]
    )
    per_rank = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(per_rank, mine)
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)

    ok = True
    if rank == 0:
        reference, _ = read_reference(tokens)
        chars = [int(t[2]) for t in per_rank]
        for r, (n_tokens, n_batches, n_chars, n_busy, n_left, ms) in enumerate(t.tolist() for t in per_rank):
            print(
                f"rank {r}: {n_tokens:,} tokens in {n_batches} batches, {n_chars:,} characters tokenized, "
                f"{n_busy}/{max(args.num_workers, 1)} workers busy, {n_left:,} tokens not yielded, "
                f"{ms / 1000:.1f} s"
            )
        lost = int((reference - total).clamp(min=0).sum())
        extra = int((total - reference).clamp(min=0).sum())
        left = sum(int(t[4]) for t in per_rank)
        steps = {int(t[1]) for t in per_rank}
        empty = [r for r, t in enumerate(per_rank) if t[0] == 0]
        if args.even_steps:
            ok = extra == 0 and lost == left and len(steps) == 1
        else:
            ok = lost == 0 and extra == 0 and not empty
        counts_by_rank = [int(t[0]) for t in per_rank]
        print(
            f"{'OK' if ok else 'FAILED'}: world_size={world_size}, {int(total.sum()):,} tokens read, "
            f"{int(reference.sum()):,} in the stream, {lost} lost, {extra} duplicated, {left} not yielded "
            f"(even_steps={args.even_steps}), steps per rank {sorted(steps)}, empty ranks: {empty}; "
            f"tokens max/min {max(counts_by_rank) / max(min(counts_by_rank), 1):.3f}, "
            f"characters tokenized {sum(chars):,} in all"
        )
    verdict = torch.tensor([int(ok)])
    dist.broadcast(verdict, src=0)
    dist.destroy_process_group()
    sys.exit(0 if verdict.item() else 1)


def read_reference(tokens):
    """One pass over the whole stream in this process, without collectives."""
    counts, batches = torch.zeros(VOCAB, dtype=torch.int64), 0
    dataset = L.StreamingLMIterableDataset(tokens, pad_last=True, rank=0, world_size=1)
    for batch in L.make_dataloader(dataset):
        counts += torch.bincount(batch["input_ids"][batch["attention_mask"] == 1], minlength=VOCAB)
        batches += 1
    return counts, batches


if __name__ == "__main__":
    main()
