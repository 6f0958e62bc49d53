"""Exactly-once across ranks, checked in a real distributed run (gloo backend, CPU).

    torchrun --standalone --nproc_per_node=2 scripts/check_distributed.py [--num-workers 2] [--source local]

Every rank builds the same pipeline (stream -> tokenize -> StreamingLMIterableDataset, which takes
its rank and world size from torch.distributed -> DataLoader) and reads its part to the end with
pad_last=True. Then the ranks all_gather their token counts and all_reduce a histogram of their
real tokens over the GPT-2 vocabulary; rank 0 compares them with one pass over the whole stream in
a single process. The run passes when the histograms are equal (no token lost, none twice) and no
rank is empty; it prints one line per rank and exits 1 otherwise.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lab2_helpers as L  # noqa: E402
from streaming_lm import config as C  # noqa: E402

VOCAB = 50257  # GPT-2 ids are < 50257


def token_histogram(loader):
    """(VOCAB,) int64 counts of the real tokens (attention_mask 1) of every batch, and the batch count."""
    counts, batches = torch.zeros(VOCAB, dtype=torch.int64), 0
    for batch in loader:
        counts += torch.bincount(batch["input_ids"][batch["attention_mask"] == 1], minlength=VOCAB)
        batches += 1
    return counts, batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--source", default="local", choices=C.SOURCES)
    parser.add_argument("--backend", default="hf", choices=C.TOKENIZER_BACKENDS)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokens = L.tokenize_stream(L.load_text_stream(args.source), L.load_tokenizer(backend=args.backend))
    dataset = L.StreamingLMIterableDataset(tokens, pad_last=True)  # rank, world_size from torch.distributed
    assert (dataset.rank, dataset.world_size) == (rank, world_size)
    counts, batches = token_histogram(L.make_dataloader(dataset, num_workers=args.num_workers))

    per_rank = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(per_rank, torch.tensor([int(counts.sum()), batches]))
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)

    ok = True
    if rank == 0:
        reference, _ = token_histogram(
            L.make_dataloader(L.StreamingLMIterableDataset(tokens, pad_last=True, rank=0, world_size=1))
        )
        for r, (n_tokens, n_batches) in enumerate(t.tolist() for t in per_rank):
            print(f"rank {r}: {n_tokens:,} tokens in {n_batches} batches ({args.num_workers} workers)")
        lost = int((reference - total).clamp(min=0).sum())
        extra = int((total - reference).clamp(min=0).sum())
        empty = [r for r, t in enumerate(per_rank) if t[0] == 0]
        ok = lost == 0 and extra == 0 and not empty
        print(
            f"{'OK' if ok else 'FAILED'}: world_size={world_size}, {int(total.sum()):,} tokens read, "
            f"{int(reference.sum()):,} in the stream, {lost} lost, {extra} duplicated, empty ranks: {empty}"
        )
    verdict = torch.tensor([int(ok)])
    dist.broadcast(verdict, src=0)
    dist.destroy_process_group()
    sys.exit(0 if verdict.item() else 1)


if __name__ == "__main__":
    main()
