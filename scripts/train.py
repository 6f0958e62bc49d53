"""Train a GPT-2 on the streaming pipeline, with crash-proof checkpoints, on one or many processes.

    python scripts/train.py --steps 200 --checkpoint-every 50 --out runs/tiny [--resume]
    torchrun --standalone --nproc_per_node=4 scripts/train.py --steps 300 --checkpoint-every 100 \\
        --out runs/gpu --device cuda --bf16 --compile --model gpt2-small --block-size 1024 --batch-size 16

Defaults: CPU, the tiny model (2 layers, width 128), the bundled sample's train split (or
--data-files), shuffled, endless epochs (training counts steps, so ranks and epochs never run out;
--epochs N stops when N epochs are read, ranks in lockstep). Each step appends one JSON object to
OUT/log.jsonl: step (1-based), loss (mean over ranks), tokens (all ranks), data_wait_s, step_s.
Every K steps OUT/checkpoint.pt gets the model, optimizer, schedule, RNG states and the data
state, written to a temporary file and renamed, so a crash at any moment, even during the write,
leaves the previous checkpoint whole. Under torchrun every rank's data state is gathered into one
(streaming_lm.state.gather_states), so --resume continues the epoch exactly once with another
--num-workers or another --nproc_per_node too (the remaining work is re-planned). --resume
continues from the checkpoint and appends to the same log: lines after its step (from the crashed
run) are dropped first, and so is a partial last line a crash left (said once); a damaged
checkpoint file is named in one line.

Token cache (--token-cache DIR, on by default: ~/.cache/streaming_lm/tokens, or $STREAMING_LM_CACHE
/tokens): each piece is tokenized once, and later epochs, resumes and runs read its tokens from DIR
(streaming_lm/cache.py); the last line gives its size. --no-token-cache tokenizes every epoch.

Loader settings: on CPU the pipeline runs in the training process (num_workers 0: on 2 cores a
worker costs more than it saves); on CUDA it uses min(8, cores // 2) workers, so tokenizing never
stalls the GPU. The summary line gives tokens/s and the share of step time spent waiting for data.
--trace-tokens writes OUT/tokens-rank{R}.jsonl: the real token ids of every step, for token accounting.
"""

import argparse
import contextlib
import json
import os
import pickle
import random
import sys
import zipfile
from pathlib import Path

if __name__ == "__main__":  # the bundled sample needs no network: never wait for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab2_helpers as L  # noqa: E402
from streaming_lm import training  # noqa: E402
from streaming_lm.cache import cache_size  # noqa: E402
from streaming_lm.config import SHUFFLE_WINDOW_BLOCKS, TOKEN_CACHE_DIR  # noqa: E402

MODELS = {"tiny": training.TINY, "gpt2-small": training.GPT2_SMALL}
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
# a resume must keep these (a checkpoint that lacks one, from an older train.py, is not checked on it)
MATCHED = ("model", "block_size", "batch_size", "backend", "seed", "epochs", "shuffle_window")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, required=True, help="train until this step (1-based, counted over resumes)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, required=True, metavar="K", help="checkpoint every K steps"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for log.jsonl and checkpoint.pt")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--block-size", type=int, default=L.BLOCK_SIZE)
    parser.add_argument("--batch-size", type=int, default=L.BATCH_SIZE)
    parser.add_argument(
        "--num-workers", type=int, default=None, help="default: 0 on cpu, min(8, cores // 2) on cuda"
    )
    parser.add_argument(
        "--backend", choices=["hf", "tiktoken"], default="hf", help="tokenizer backend (same ids)"
    )
    parser.add_argument(
        "--data-files", nargs="+", help="local files to train on (default: the bundled sample)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="stop after N epochs (default: endless)")
    parser.add_argument(
        "--shuffle-window",
        type=int,
        default=SHUFFLE_WINDOW_BLOCKS,
        metavar="BLOCKS",
        help=f"blocks shuffled together per part (default {SHUFFLE_WINDOW_BLOCKS}); memory: BLOCKS x "
        "block size x 8 bytes; smaller windows let an elastic resume share a part's rest among more ranks",
    )
    parser.add_argument(
        "--token-cache",
        type=Path,
        default=Path(TOKEN_CACHE_DIR),
        metavar="DIR",
        help=f"keep each piece's tokens in DIR; later epochs and runs read them (default {TOKEN_CACHE_DIR})",
    )
    parser.add_argument("--no-token-cache", action="store_true", help="tokenize the text every epoch")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--lr", type=float, default=training.LEARNING_RATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-tokens", action="store_true", help="write OUT/tokens-rank{R}.jsonl")
    args = parser.parse_args(argv)
    for name in ("steps", "checkpoint_every", "block_size", "batch_size", "shuffle_window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.num_workers is None:
        args.num_workers = 0 if args.device == "cpu" else min(8, (os.cpu_count() or 2) // 2)
    return args


def start_distributed(args):
    """(rank, world_size): torch.distributed set up when torchrun started several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    return dist.get_rank(), dist.get_world_size()


def make_loader(args, world_size):
    """The pipeline: text -> tokens -> shuffled blocks (endless, or --epochs) -> batches."""
    files = args.data_files
    stream = L.load_text_stream("local", data_files=files) if files else L.load_text_stream("local")
    cache = None if args.no_token_cache else args.token_cache
    tokens = L.tokenize_stream(stream, L.load_tokenizer(backend=args.backend), cache_dir=cache)
    dataset = L.StreamingLMIterableDataset(
        tokens,
        args.block_size,
        shuffle=True,
        seed=args.seed,
        epochs=args.epochs,
        shuffle_window=args.shuffle_window,
    )  # rank and world size from torch.distributed
    lockstep = world_size > 1 and args.epochs is not None  # a finite pass: ranks end together
    pin = args.device.startswith("cuda")
    return L.make_dataloader(dataset, args.batch_size, args.num_workers, pin_memory=pin, even_steps=lockstep)


def gathered(value, world_size):
    """[value of every rank] (all_gather_object), or [value] in one process."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(out, step, model, optimizer, schedule, loader, args, rank, world_size):
    """Every rank's data state and RNG states gathered; rank 0 writes, then renames: a crash during
    the write leaves the previous checkpoint whole."""
    data = L.gather_states(gathered(loader.state_dict(), world_size))
    rngs = gathered(rng_states(), world_size)
    if rank == 0:
        state = {
            "step": step,
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "loader": data,
            "rng": rngs,
            "args": {k: v for k, v in vars(args).items() if k in MATCHED},
        }
        tmp = out / f"{CHECKPOINT}.tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / CHECKPOINT)
    if world_size > 1:
        dist.barrier()


def read_checkpoint(path):
    """The checkpoint's contents, or SystemExit naming a missing or damaged file in one line."""
    if not path.is_file():
        raise SystemExit(f"--resume: no {path} (run without --resume first)")
    try:
        return torch.load(path, weights_only=False)  # our own file: it holds numpy and Python RNG states
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise SystemExit(
            f"--resume: {path} is damaged and cannot be read ({type(err).__name__}: {str(err)[:120]}); "
            "restore a copy of it, or delete it and start afresh without --resume"
        ) from None


def load_checkpoint(out, model, optimizer, schedule, loader, args, rank):
    """Restore everything from OUT/checkpoint.pt; returns its step. Refuses another model or data setup."""
    path = out / CHECKPOINT
    state = read_checkpoint(path)
    saved = state["args"]
    ours = {k: v for k, v in vars(args).items() if k in saved}
    if saved != ours:
        raise SystemExit(f"--resume: {path} was saved with {saved}, this run has {ours}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    try:
        loader.load_state_dict(state["loader"])  # another world size or num_workers: re-planned
    except ValueError as err:
        raise SystemExit(f"--resume: {path}: its data state cannot be resumed here: {err}") from None
    rngs = state["rng"]
    set_rng_states(rngs[rank] if rank < len(rngs) else rngs[0])
    return state["step"]


def trim_log(path, last_step, note=True):
    """Keep the log's lines up to `last_step`: the crashed run's later steps are done again. A
    partial last line (a crash while writing it) is dropped, and said; a bad line elsewhere is an error."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise SystemExit(f"--resume: {path}, line {number} is not JSON: {line[:80]!r}") from None
            if note:
                print(f"{path}: dropped a partial last line (a crash while it was written): {line[:60]!r}")
    kept = [r for r in records if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def tap(batches, trace, first_step):
    """The batches; with a `trace` file, each one's step and real tokens appended to it as it is taken."""
    for step, batch in enumerate(batches, first_step):
        if trace is not None:
            tokens = batch["input_ids"][batch["attention_mask"] == 1].tolist()
            trace.write(json.dumps({"step": step, "tokens": tokens}) + "\n")
        yield batch


def main(argv=None):
    args = parse_args(argv)
    rank, world_size = start_distributed(args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = training.make_model(MODELS[args.model], args.block_size).to(args.device)
    optimizer, schedule = training.make_optimizer(model, args.lr)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    loader = make_loader(args, world_size)
    start = load_checkpoint(args.out, model, optimizer, schedule, loader, args, rank) if args.resume else 0
    log_path, trace_path = args.out / LOG, args.out / f"tokens-rank{rank}.jsonl"
    if not args.resume and rank == 0 and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    if args.resume and rank == 0:
        trim_log(log_path, start)
    if args.resume and args.trace_tokens:
        trim_log(trace_path, start, note=False)
        if rank == 0:  # fewer processes than before: the traces of ranks that are gone are trimmed too
            for gone in sorted(args.out.glob("tokens-rank*.jsonl")):
                if int(gone.stem.removeprefix("tokens-rank")) >= world_size:
                    trim_log(gone, start, note=False)
    compiled = torch.compile(model) if args.compile else model
    if rank == 0:
        print(
            f"training {args.model} on {args.device} x {world_size} from step {start} to {args.steps}, "
            f"{args.num_workers} worker{'s' * (args.num_workers != 1)}, {args.backend} tokenizer, "
            f"batch {args.batch_size} x {args.block_size}",
            flush=True,
        )
    run(args, compiled, model, optimizer, schedule, loader, start, rank, world_size)
    if world_size > 1:  # no rank closes its connections while another still uses them (gloo aborts then)
        dist.barrier()
        dist.destroy_process_group()


def run(args, compiled, model, optimizer, schedule, loader, start, rank, world_size):
    """The training loop: log (rank 0), token trace (each rank), checkpoints, summary."""
    with contextlib.ExitStack() as files:
        trace_mode = "a" if args.resume else "w"
        trace_path = args.out / f"tokens-rank{rank}.jsonl"
        trace = files.enter_context(open(trace_path, trace_mode)) if args.trace_tokens else None
        log = files.enter_context(open(args.out / LOG, "a")) if rank == 0 else None
        batches = tap(loader, trace, start + 1)
        records = training.train_steps(
            compiled, batches, args.steps - start, optimizer, schedule, args.device, args.bf16
        )
        totals = {"tokens": 0, "wait": 0.0, "time": 0.0, "steps": 0}
        for record in records:
            record["step"] += start
            if trace is not None:
                trace.flush()
            if world_size > 1:  # the mean loss over the ranks' batches, the tokens of all of them
                summed = torch.tensor([record["loss"], record["tokens"]], dtype=torch.float64)
                dist.all_reduce(summed)
                record["loss"], record["tokens"] = summed[0].item() / world_size, int(summed[1].item())
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            for key, name in (("tokens", "tokens"), ("wait", "data_wait_s"), ("time", "step_s")):
                totals[key] += record[name]
            totals["steps"] += 1
            if record["step"] % args.checkpoint_every == 0:
                save_checkpoint(
                    args.out, record["step"], model, optimizer, schedule, loader, args, rank, world_size
                )
                if rank == 0:
                    print(f"step {record['step']}: loss {record['loss']:.3f}, checkpoint saved", flush=True)
    summarize(args, loader, start, totals, rank)


def summarize(args, loader, start, totals, rank):
    """The run's last lines: where the data ran out (finite epochs), tokens/s, the data wait."""
    if start + totals["steps"] < args.steps:
        held = loader.not_yielded["tokens"]
        print(f"rank {rank}: the data ran out after step {start + totals['steps']}; {held} tokens held back")
    if rank == 0 and totals["time"]:
        print(
            f"done: {totals['tokens'] / totals['time']:,.0f} tokens/s, data wait "
            f"{100 * totals['wait'] / totals['time']:.1f} % of step time"
        )
    if rank == 0 and not args.no_token_cache:
        size = cache_size(args.token_cache)
        print(
            f"token cache {args.token_cache}: {size['entries']} pieces, {size['tokens']:,} tokens, "
            f"{size['bytes'] / 2**20:,.2f} MiB ({size['bytes_per_token']:.2f} bytes a token)"
        )


if __name__ == "__main__":
    main()
