"""GPT-2 tokenizers and their fastest exact encoders: texts -> (flat ids, row offsets).

Two backends give identical ids: Hugging Face's GPT2TokenizerFast (the default) and tiktoken's
GPT-2 encoding built from the same bundled files (several times faster, docs/benchmark.md). The fast
path never makes a Python object per token: a batch of rows goes to the tokenizer as a whole and
comes back as one flat id array plus row offsets. tiktoken encodes the rows joined by
"<|endoftext|>" in one `encode_to_numpy` call per thread (it splits at special tokens before its
regex, so the ids are exactly the per-row ids; a row that holds that text literally is encoded on
its own, as text); HF's tokenizer encodes with its Rust `encode_batch_fast`, checked against the
call on a prefix of the first batch. In-process the encoding runs in threads while the caller packs.
"""

import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import check_choice
from .config import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    TOKENIZE_CHARS,
    TOKENIZER_BACKENDS,
    TOKENIZER_DIR,
)

logger = logging.getLogger(__name__)


THREAD_CHARS = 16_384  # characters: a smaller batch is encoded by one thread (a thread's turn costs ~50 us)


def in_worker() -> bool:
    """True inside a DataLoader worker process (whose parallelism is the workers: one thread each)."""
    return torch.utils.data.get_worker_info() is not None


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding built from the bundled files, called like a HF tokenizer.

    `tok(texts)["input_ids"]` -> list of id lists, identical to GPT2TokenizerFast's ids; a literal
    "<|endoftext|>" in text is ordinary text unless `split_special_tokens=False`. `encode_flat(texts)`
    is the fast path: (ids (N,) uint32, row offsets (n + 1,) int64). Both use one thread inside a
    DataLoader worker and a long-lived pool of `num_threads` (default: all cores) in-process;
    tiktoken releases the GIL, so the threads run in parallel (2 cores: 7.1 M tokens/s, 4.1 M on one).
    """

    eos_token = EOS_TOKEN
    eos_token_id = EOS_TOKEN_ID

    def __init__(self, folder: str | Path = TOKENIZER_DIR, num_threads: int | None = None) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        folder = Path(folder)
        ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "merges.txt"), str(folder / "vocab.json"))
        specials = {self.eos_token: EOS_TOKEN_ID}
        self.encoding = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials
        )
        self.name_or_path = str(folder)
        self.vocab_size = self.encoding.n_vocab
        self.num_threads = num_threads or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None

    def threads(self) -> int:
        """Threads to encode with here: 1 in a DataLoader worker, else `num_threads`."""
        return 1 if in_worker() else self.num_threads

    def pool(self) -> ThreadPoolExecutor:
        """One thread pool per process, made on first use (a pool per call cost ~0.3 ms)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor, self._executor_pid = ThreadPoolExecutor(self.num_threads), os.getpid()
        return self._executor

    def _encode_rows(self, texts: Sequence[str], allowed: str | set) -> list[list[int]]:
        if allowed:
            return [self.encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        return [self.encoding.encode_ordinary(t) for t in texts]

    def __call__(self, text: str | Sequence[str], split_special_tokens: bool = True, **_ignored: Any) -> dict:
        """Encode a string or a list of strings; returns {"input_ids": ids or list of ids}."""
        allowed = set() if split_special_tokens else "all"
        if isinstance(text, str):
            return {"input_ids": self._encode_rows([text], allowed)[0]}
        ids, starts = self.encode_flat(list(text)) if split_special_tokens else (None, None)
        if ids is None:
            return {"input_ids": self._encode_rows(list(text), allowed)}
        return {"input_ids": [ids[a:b].tolist() for a, b in itertools.pairwise(starts)]}

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) uint32, starts (n + 1,) int64): row k is ids[starts[k]:starts[k + 1]], each row
        encoded as ordinary text. Threads take contiguous chunks of rows."""
        encoded = self.submit_flat(texts)
        return encoded.result() if isinstance(encoded, Future) else encoded

    def submit_flat(self, texts: list[str]) -> "Future | tuple[np.ndarray, np.ndarray]":
        """`encode_flat(texts)` started in the pool, one chunk of rows per thread (in-process), so
        that the caller can pack the previous batch meanwhile; in a worker, the result itself."""
        lengths = np.fromiter(map(len, texts), np.int64, count=len(texts))
        threads = min(self.threads(), len(texts), max(1, int(lengths.sum()) // THREAD_CHARS))
        if threads <= 1:
            return self._encode_joined(texts)
        share = np.cumsum(lengths) * threads // max(int(lengths.sum()), 1)  # (n,) which thread, by characters
        cuts = [0, *np.searchsorted(share, np.arange(1, threads), side="left").tolist(), len(texts)]
        pool = self.pool()
        chunks = [pool.submit(self._encode_joined, texts[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
        return gather_futures(chunks)

    def _encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One encode_to_numpy call over the rows joined by EOS; the separators give the offsets."""
        if not texts:
            return np.empty(0, np.uint32), np.zeros(1, np.int64)
        joined = EOS_TOKEN.join(texts)
        if joined.count(EOS_TOKEN) != len(texts) - 1:  # a row holds the literal: encode it as text
            return self._encode_with_literals(texts)
        ids = self.encoding.encode_to_numpy(joined, allowed_special={EOS_TOKEN})  # (N + n - 1,)
        seps = np.flatnonzero(ids == EOS_TOKEN_ID)  # (n - 1,) the separators, one per row boundary
        starts = np.empty(len(texts) + 1, np.int64)
        starts[0], starts[-1] = 0, len(ids) - len(seps)
        starts[1:-1] = seps - np.arange(len(seps))  # each separator shifts the rest left by one
        return np.delete(ids, seps), starts

    def _encode_with_literals(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding the literal "<|endoftext|>" encoded one by one as text, the others joined."""
        pieces = []
        for literal, group in itertools.groupby(texts, key=lambda t: EOS_TOKEN in t):
            rows = list(group)
            if not literal:
                pieces.append(self._encode_joined(rows))
                continue
            encoded = [np.asarray(self.encoding.encode_ordinary(t), np.uint32) for t in rows]
            lengths = np.array([len(e) for e in encoded], np.int64)
            pieces.append((np.concatenate(encoded), np.concatenate([[0], np.cumsum(lengths)])))
        return join_flat(pieces)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None, "_executor_pid": None}  # threads do not pickle

    def decode(self, ids: Sequence[int], **_ignored: Any) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"TiktokenGPT2(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def gather_futures(chunks: list[Future]) -> Future:
    """One Future of the joined (ids, starts) of chunk futures, done when the last chunk is."""
    out: Future = Future()
    chunks = list(chunks)  # cleared when done
    left, lock = [len(chunks)], threading.Lock()

    def done(_: Future) -> None:
        with lock:  # pool threads finish at once
            left[0] -= 1
            last = not left[0]
        if last:
            _settle(out, lambda: join_flat([c.result() for c in chunks]))
            chunks.clear()  # each chunk's callback holds `chunks`: a cycle kept results to the next gc

    for chunk in chunks:
        chunk.add_done_callback(done)
    return out


def join_flat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several (ids, starts) of consecutive row chunks as one (ids, starts)."""
    ids = np.concatenate([p[0] for p in parts])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    starts = np.concatenate([p[1][:-1] + o for p, o in zip(parts, offsets)] + [[len(ids)]])
    return ids, starts.astype(np.int64, copy=False)


def _settle(out: Future, make: Any) -> None:
    try:
        out.set_result(make())
    except Exception as err:  # noqa: BLE001 - handed to the waiting reader, which raises it
        out.set_exception(err)


def load_tokenizer(name_or_path: str | None = None, *, backend: str = "hf") -> Any:
    """The GPT-2 tokenizer. None: the bundled files (ids identical to the Hub's `gpt2`), offline.

    backend="hf" (default): transformers' GPT2TokenizerFast; any other `name_or_path` goes to
    AutoTokenizer.from_pretrained. backend="tiktoken": `TiktokenGPT2`, same ids, several times faster.
    """
    check_choice("backend", backend, TOKENIZER_BACKENDS)
    if backend == "tiktoken":
        if name_or_path is not None:
            raise ValueError("backend='tiktoken' reads only the bundled GPT-2 files: leave name_or_path=None")
        return TiktokenGPT2()
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name_or_path is None:
        # Not GPT2TokenizerFast(vocab_file=..., merges_file=...): in transformers 5.x that builds an
        # empty tokenizer. from_pretrained(folder) reads the two files correctly (4.x and 5.x).
        return GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(name_or_path)


def tokenizer_identity(tokenizer: Any) -> str:
    """What a checkpoint records of the tokenizer: the bundled GPT-2 files (either backend: same
    ids) or its name, with the vocabulary size."""
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if Path(name).resolve() == TOKENIZER_DIR.resolve():
        name = "gpt2 (bundled files)"
    size = getattr(tokenizer, "vocab_size", None)
    return f"{name}, vocab {size}"


def tokenizer_key(tokenizer: Any) -> str:
    """What a token cache entry records of the tokenizer: `tokenizer_identity`, and a digest of its
    whole definition where it has one (a fast HF tokenizer other than the bundled GPT-2 files)."""
    name, backend = tokenizer_identity(tokenizer), getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or name.startswith("gpt2 (bundled files)"):
        return name
    return f"{name} #{hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]}"


def gpt2_pretokenizer(tokenizer: Any) -> bool:
    """True if a fast tokenizer splits text as GPT-2 does before BPE (byte-level, GPT-2's regex, no
    prefix space, no normalizer): then `cut_long` keeps its ids (the bundled GPT-2 files do)."""
    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    byte_level = type(pre).__name__ == "ByteLevel" and getattr(pre, "use_regex", False)
    return backend.normalizer is None and byte_level and not getattr(pre, "add_prefix_space", True)


class HFFastEncoder:
    """A transformers fast tokenizer's Rust backend, `encode_batch_fast` (no offsets): the same ids
    as `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`, checked on the first
    batch (else the call itself is used). Batches holding a special token's text go through the call.
    In-process a batch is encoded in a helper thread (the Rust encoder releases the GIL and uses all
    cores) while the caller packs the previous one."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cuts_long_rows = gpt2_pretokenizer(tokenizer)
        backend = tokenizer.backend_tokenizer
        self.encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.specials = tuple(tokenizer.all_special_tokens)
        self.checked = False
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None

    def __call__(self, texts: list[str]) -> "tuple[np.ndarray, np.ndarray] | Future":
        if in_worker():
            return self.encode(texts)
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor, self._executor_pid = ThreadPoolExecutor(1), os.getpid()
        return self._executor.submit(self.encode, texts)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        joined = "\0".join(texts)  # one scan for special tokens' text (\0 never joins two rows into one)
        if self.encode_batch is None or any(s in joined for s in self.specials):
            return CallEncoder(self.tokenizer)(texts)
        if not self.checked:
            self.check(texts)
        if self.encode_batch is None:
            return CallEncoder(self.tokenizer)(texts)
        return flatten([e.ids for e in self.encode_batch(texts, add_special_tokens=False)])

    def check(self, texts: list[str]) -> None:
        """Compare the Rust encoder with the call on a prefix of the first batch (16 rows of at most
        1,000 characters: cheap next to the batch); on any difference, use the call from now on."""
        self.checked = True
        sample = [t[:1000] for t in texts[:16]]
        rows = [e.ids for e in self.encode_batch(sample, add_special_tokens=False)]
        if rows != CallEncoder.rows(self.tokenizer, sample):
            logger.warning("%s: its Rust batch encoder differs from its call: using the call", self.tokenizer)
            self.encode_batch = None

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "checked": self.checked}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"])
        self.checked = state["checked"]


class CallEncoder:
    """Any callable tokenizer: `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`,
    about TOKENIZE_CHARS characters per call (its Python lists of ints cost ~32 bytes a token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def rows(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)
        return list(out["input_ids"])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts, start = [], 0
        while start < len(texts):
            end, chars = start + 1, len(texts[start])
            while end < len(texts) and chars + len(texts[end]) <= TOKENIZE_CHARS:
                chars, end = chars + len(texts[end]), end + 1
            parts.append(flatten(self.rows(self.tokenizer, texts[start:end])))
            start = end
        return join_flat(parts) if parts else flatten([])


def flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (ids (N,) int64, starts (n + 1,) int64)."""
    lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=int(starts[-1]))
    return ids, starts


class TiktokenEncoder:
    """`TiktokenGPT2.submit_flat` as an encoder: texts -> (ids, starts), or a Future of them."""

    cuts_long_rows = True  # GPT-2's pre-tokenizer: see cut_long

    def __init__(self, tokenizer: TiktokenGPT2) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> "tuple[np.ndarray, np.ndarray] | Future":
        return self.tokenizer.submit_flat(texts)


def make_encoder(tokenizer: Any) -> Any:
    """The fastest exact encoder for `tokenizer`: texts -> (ids, starts), or a Future of them."""
    if isinstance(tokenizer, TiktokenGPT2):
        return TiktokenEncoder(tokenizer)
    if getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
        return HFFastEncoder(tokenizer)
    return CallEncoder(tokenizer)
