"""Train a GPT-2 on the streaming pipeline, with crash-proof checkpoints.

    python scripts/train.py --steps 200 --checkpoint-every 50 --out runs/tiny [--resume]
    python scripts/train.py --steps 300 --checkpoint-every 100 --out runs/gpu \\
        --device cuda --bf16 --compile --model gpt2-small --block-size 1024 --batch-size 16

Defaults: CPU, the tiny model (2 layers, width 128), the bundled sample's train split, shuffled,
endless epochs (training counts steps, so ranks and epochs never run out). Each step appends one
JSON object to OUT/log.jsonl: step (1-based), loss, tokens, data_wait_s, step_s. Every
K steps OUT/checkpoint.pt gets the model, optimizer, schedule, loader state (stream position and
carried tokens of every worker) and RNG states, written to a temporary file and renamed, so a
crash at any moment, even during the write, leaves the previous checkpoint whole. --resume
continues from it and appends to the same log (lines after the checkpoint's step, from the
crashed run, are dropped first, so every step appears once).

Loader settings: on CPU the pipeline runs in the training process (num_workers 0: on 2 cores a
worker costs more than it saves); on CUDA it uses min(8, cores // 2) workers, so tokenizing never
stalls the GPU. The summary line gives tokens/s and the share of step time spent waiting for data.
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

if __name__ == "__main__":  # the bundled sample needs no network: never wait for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab2_helpers as L  # noqa: E402
from streaming_lm import training  # noqa: E402

MODELS = {"tiny": training.TINY, "gpt2-small": training.GPT2_SMALL}
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


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
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--lr", type=float, default=training.LEARNING_RATE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "checkpoint_every", "block_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.num_workers is None:
        args.num_workers = 0 if args.device == "cpu" else min(8, (os.cpu_count() or 2) // 2)
    return args


def make_loader(args):
    """The pipeline: bundled sample -> tokens -> shuffled endless blocks -> batches."""
    tokens = L.tokenize_stream(L.load_text_stream("local"), L.load_tokenizer(backend=args.backend))
    dataset = L.StreamingLMIterableDataset(tokens, args.block_size, shuffle=True, seed=args.seed, epochs=None)
    pin = args.device == "cuda"
    return L.make_dataloader(dataset, args.batch_size, args.num_workers, pin_memory=pin)


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


def save_checkpoint(out, step, model, optimizer, schedule, loader, args):
    """Write, then rename: a crash during the write leaves the previous checkpoint whole."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "loader": loader.state_dict(),
        "rng": rng_states(),
        "args": {
            k: v
            for k, v in vars(args).items()
            if k in ("model", "block_size", "batch_size", "backend", "seed")
        },
    }
    tmp = out / f"{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out, model, optimizer, schedule, loader, args):
    """Restore everything from OUT/checkpoint.pt; returns its step. Refuses another model or data setup."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"--resume: no {path} (run without --resume first)")
    state = torch.load(path, weights_only=False)  # our own file: it holds numpy and Python RNG states
    saved = state["args"]
    ours = {k: v for k, v in vars(args).items() if k in saved}
    if saved != ours:
        raise SystemExit(f"--resume: {path} was saved with {saved}, this run has {ours}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    loader.load_state_dict(state["loader"])
    set_rng_states(state["rng"])
    return state["step"]


def trim_log(path, last_step):
    """Keep the log's lines up to `last_step`: the crashed run's later steps are done again."""
    if path.exists():
        lines = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(line + "\n" for line in lines))


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = training.make_model(MODELS[args.model], args.block_size).to(args.device)
    optimizer, schedule = training.make_optimizer(model, args.lr)
    loader = make_loader(args)
    start = load_checkpoint(args.out, model, optimizer, schedule, loader, args) if args.resume else 0
    log_path = args.out / LOG
    if args.resume:
        trim_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    compiled = torch.compile(model) if args.compile else model
    print(
        f"training {args.model} on {args.device} from step {start} to {args.steps}, "
        f"{args.num_workers} workers, {args.backend} tokenizer, batch {args.batch_size} x {args.block_size}",
        flush=True,
    )
    records = training.train_steps(
        compiled, loader, args.steps - start, optimizer, schedule, args.device, args.bf16
    )
    totals = {"tokens": 0, "wait": 0.0, "time": 0.0}
    with open(log_path, "a") as log:
        for record in records:
            record["step"] += start
            log.write(json.dumps(record) + "\n")
            log.flush()
            totals["tokens"] += record["tokens"]
            totals["wait"] += record["data_wait_s"]
            totals["time"] += record["step_s"]
            if record["step"] % args.checkpoint_every == 0:
                save_checkpoint(args.out, record["step"], model, optimizer, schedule, loader, args)
                print(f"step {record['step']}: loss {record['loss']:.3f}, checkpoint saved", flush=True)
    if totals["time"]:
        print(
            f"done: {totals['tokens'] / totals['time']:,.0f} tokens/s, data wait "
            f"{100 * totals['wait'] / totals['time']:.1f} % of step time"
        )


if __name__ == "__main__":
    main()
