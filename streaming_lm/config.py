"""Constants of the pipeline, in one place, with their units."""

import os
from pathlib import Path

BLOCK_SIZE = 256  # tokens per training example
BATCH_SIZE = 8  # examples per batch
MAX_BLOCK_SIZE = 1_048_576  # tokens: larger blocks are refused (2**31 would try to allocate 16 GiB)

DATASET_NAME = "wikitext"  # the lab's name for the data set
# Its Hub repository. The bare "wikitext" is an old alias: huggingface_hub >= 1.0 refuses repository
# ids without a namespace ("Repository id must be 'namespace/name'"), so load_dataset("wikitext", ...)
# fails with datasets 5 before it reads a byte. The train split is 2 parquet files, 33 row groups.
DATASET_REPO = "Salesforce/wikitext"
DATASET_CONFIG = "wikitext-103-v1"
DATASET_SPLIT = "train"
TEXT_COLUMN = "text"
# The WikiText family: its four configs share the article layout (" = Title = " rows, blank rows)
WIKITEXT_CONFIGS = ("wikitext-103-v1", "wikitext-103-raw-v1", "wikitext-2-v1", "wikitext-2-raw-v1")

EOS_TOKEN_ID = 50256  # GPT-2 <|endoftext|>: document separator and padding id
EOS_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257  # ids 0..50256
IGNORE_INDEX = -100  # label of padding: ignored by torch.nn.functional.cross_entropy

TOKENIZE_BATCH_ROWS = 1000  # rows read and tokenized together (fewer when rows are long, see below)
TOKENIZE_BATCH_CHARS = 4_000_000  # characters per tokenizing batch, about: fewer rows when rows are long
TOKENIZE_CHARS = 1_000_000  # characters per tokenizer call, about, for the fallback paths' Python lists
LONG_ROW_CHARS = 65_536  # characters: longer rows are cut for the GPT-2 encoders' threads (same ids)
SAMPLE_BYTES = 1 << 20  # bytes read from a text/JSON file to estimate its row length
LAYOUT_PEEK_ROWS = 50  # rows of a stream's first piece read to decide its document rule ("auto")
SHUFFLE_WINDOW_BLOCKS = 256  # blocks shuffled together per part (256 x 256 tokens x 8 bytes = 0.5 MiB)
TRANSFER_BATCHES = 8  # batches a DataLoader worker ships per transfer (one numpy array, ~0.3 ms)
PREFETCH_TRANSFERS = 2  # transfers queued per DataLoader worker (torch's default prefetch_factor)
CACHE_RECENT_BYTES = 64 << 20  # bytes of token cache entries a process keeps open (small pieces, many epochs)
CACHE_CHUNK_TOKENS = 1 << 20  # tokens read from a token cache entry at a time (2 MiB of uint16, 8 MiB packed)
MIX_STRATUM_BLOCKS = 100  # a mixture draws its sources in strata of 100 blocks: shares exact per stratum
MIX_STRATA_DRAWN = 64  # strata drawn at once, from one generator (6,400 blocks)
# epochs in a row without a block, per piece, after which an endless shuffled part is given up (the
# chance that a piece with a block never came to it by then is below e^-20)
EMPTY_EPOCHS_PER_PIECE = 20

HUB_PROBE_SECONDS = 5.0  # seconds: give up on the Hub after this long (datasets alone retries ~25 s)
HUB_RETRIES = 4  # load_dataset attempts after the first when the Hub answers 429 or 5xx
HUB_RETRY_SECONDS = 1.0  # the first wait; it doubles each time (1 + 2 + 4 + 8 s at most)
HUB_RETRY_STATUSES = (429, 500, 502, 503, 504)  # rate limited or briefly unavailable
# seconds: how long a stream retries a Hub that went away (then one ~23 s huggingface_hub cycle at most);
# the environment variable STREAMING_LM_HUB_DEADLINE overrides it
HUB_READ_DEADLINE_SECONDS = 45.0
HUB_READ_RETRY_SECONDS = 2.0  # seconds between two such retries

ROOT = Path(__file__).resolve().parents[1]  # the repository
# scripts/train.py's token cache (cache.py): $STREAMING_LM_CACHE/tokens, else ~/.cache/streaming_lm/tokens
TOKEN_CACHE_DIR = os.path.join(os.environ.get("STREAMING_LM_CACHE", "~/.cache/streaming_lm"), "tokens")
DATA_DIR = ROOT / "data"
TOKENIZER_DIR = DATA_DIR / "gpt2_tokenizer"  # vocab.json + merges.txt, byte-identical to the Hub's gpt2
SAMPLE_DIR = DATA_DIR / "wikitext_sample"  # Moby-Dick laid out like the Hub's Salesforce/wikitext
SAMPLE_FILES = "wikitext-103-v1/{split}-*.parquet"  # per split, as on the Hub
# a second small source: 26 State of the Union addresses (1790-1815, public domain)
SOTU_FILE = DATA_DIR / "sotu" / "sotu_1790_1815.jsonl"

SOURCES = ("auto", "hub", "local")
LAYOUTS = ("auto", "wikitext", "rows")
TOKENIZER_BACKENDS = ("hf", "tiktoken")
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
OFFLINE_VALUES = {"1", "true", "yes", "on"}
