"""Constants of the pipeline, in one place, with their units."""

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

EOS_TOKEN_ID = 50256  # GPT-2 <|endoftext|>: document separator and padding id
GPT2_VOCAB_SIZE = 50257  # ids 0..50256
IGNORE_INDEX = -100  # label of padding: ignored by torch.nn.functional.cross_entropy

TOKENIZE_BATCH_ROWS = 1000  # rows per batch of the lazy map (256: 10-20 % slower on WikiText rows)
TOKENIZE_CHARS = 1_000_000  # characters per tokenizer call at most (one longer text goes alone)
TOKENIZE_BATCH_CHARS = 4_000_000  # characters per map batch, about: fewer rows when rows are long
SAMPLE_BYTES = 1 << 20  # bytes read from a text/JSON file to estimate its row length
PIECE_BATCH_ROWS = 64  # rows the dataset takes from a piece at a time (1 at a time: 2x the overhead)
FILL_BLOCKS = 8  # the packer joins rows once per 8 blocks' worth of tokens: few numpy calls, small carry
SHUFFLE_WINDOW_BLOCKS = 256  # blocks shuffled together per part (256 x 256 tokens x 8 bytes = 0.5 MiB)
PREFETCH_BATCHES = 16  # batches queued per DataLoader worker (torch's default: 2)
HUB_PROBE_SECONDS = 5.0  # seconds: give up on the Hub after this long (datasets alone retries ~25 s)
HUB_RETRIES = 4  # load_dataset attempts after the first when the Hub answers 429 or 5xx
HUB_RETRY_SECONDS = 1.0  # the first wait; it doubles each time (1 + 2 + 4 + 8 s at most)
HUB_RETRY_STATUSES = (429, 500, 502, 503, 504)  # rate limited or briefly unavailable

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA_DIR = ROOT / "data"
TOKENIZER_DIR = DATA_DIR / "gpt2_tokenizer"  # vocab.json + merges.txt, byte-identical to the Hub's gpt2
SAMPLE_DIR = DATA_DIR / "wikitext_sample"  # Moby-Dick laid out like the Hub's Salesforce/wikitext
SAMPLE_FILES = "wikitext-103-v1/{split}-*.parquet"  # per split, as on the Hub

SOURCES = ("auto", "hub", "local")
LAYOUTS = ("auto", "wikitext", "rows")
TOKENIZER_BACKENDS = ("hf", "tiktoken")
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
OFFLINE_VALUES = {"1", "true", "yes", "on"}
