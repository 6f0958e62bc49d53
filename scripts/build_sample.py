"""Build the bundled offline sample: Moby-Dick in the WikiText-103 row layout and the Hub's file layout.

    python scripts/build_sample.py [--source data/source/moby_dick.jsonl] [--out data/wikitext_sample]

Reads one JSON object per chapter (`id`, `chapter`, `title`, `text`, paragraphs separated by a
blank line) and writes, like the Hub's `Salesforce/wikitext` repository:

    data/wikitext_sample/wikitext-103-v1/train-00000-of-00002.parquet   126 articles in 2 files
    data/wikitext_sample/wikitext-103-v1/train-00001-of-00002.parquet
    data/wikitext_sample/wikitext-103-v1/validation-00000-of-00001.parquet   6 held-out articles
    data/wikitext_sample/wikitext-103-v1/test-00000-of-00001.parquet         6 held-out articles

a single `text` column whose rows look like the Hub's `wikitext-103-v1` rows:

    ''                                      <- blank rows are empty strings
    ' = Chapter 1 : Loomings = \\n'          <- an article starts at a top-level heading
    ''
    ' Call me Ishmael . ... \\n'              <- one row per line, trailing "\\n" kept
    ' = = Book I ( Folio ) = = \\n'           <- sections (only where the book has them)

One article per chapter (138). Validation and test hold out every 23rd article (like WikiText's
splits: whole articles, never seen in training). Each parquet row group holds ARTICLES_PER_GROUP
whole articles, so `datasets`' `reshard()` gives 32 train pieces from 2 files: enough for 8
DataLoader workers or ranks. The text is public domain (data/source/README.md); running the script
twice writes the same rows.
"""

import argparse
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "data" / "source" / "moby_dick.jsonl"
OUT_DIR = ROOT / "data" / "wikitext_sample"
CONFIG = "wikitext-103-v1"  # the Hub's folder name
TRAIN_FILES = 2  # parquet files of the train split, as on the Hub
ARTICLES_PER_GROUP = 4  # whole articles per parquet row group (the pieces ranks and workers get)
HELD_OUT_EVERY = 23  # every 23rd article goes to validation (from 11) and test (from 22): 6 each

# Chapter 32 ("Cetology") is the one chapter with real sub-divisions.
SECTION_RE = re.compile(r"^(BOOK [IVX]+\. \(\w+\))")


def wikitext_line(text):
    """One WikiText row: leading space, punctuation spaced like WikiText, trailing ' \\n'."""
    text = re.sub(r"(?<=\w)-(?=\w)", " @-@ ", text.strip())  # WikiText's intra-word hyphen
    text = re.sub(r"([.,;:!?()\"—])", r" \1 ", text)
    return " " + re.sub(r"\s+", " ", text).strip() + " \n"


def heading(title, level=1):
    """A WikiText heading row: ' = Title = \\n' (level 1), ' = = Section = = \\n' (level 2)."""
    marks = " ".join(["="] * level)
    return f" {marks} {title} {marks} \n"


def article_rows(chapter):
    """Rows of one chapter as a WikiText article: heading, blank, lines; sections in place."""
    name = chapter["chapter"]
    title = chapter["title"].rstrip(".")
    title = f"Chapter {name} : {title}" if name.isdigit() else name
    rows = ["", heading(wikitext_line(title).strip()), ""]
    book = None
    for paragraph in chapter["text"].split("\n\n"):
        match = SECTION_RE.match(paragraph)
        if match and match.group(1) != book:
            book = match.group(1)
            rows += ["", heading(wikitext_line(book).strip(), level=2), ""]
        rows += [wikitext_line(line) for line in paragraph.split("\n") if line.strip()]
    return rows


def split_articles(articles, n_shards):
    """Contiguous groups of articles with about equal character counts."""
    sizes = [sum(len(r) for r in rows) for rows in articles]
    target = sum(sizes) / n_shards
    shards, current, filled = [], [], 0.0
    for rows, size in zip(articles, sizes):
        current.append(rows)
        filled += size
        if filled >= target * (len(shards) + 1) and len(shards) < n_shards - 1:
            shards.append(current)
            current = []
    shards.append(current)
    assert len(shards) == n_shards and all(shards), "too few articles for the shard count"
    return shards


def split_of(index):
    """The split ("validation", "test" or "train") of the article at `index` in reading order."""
    if index % HELD_OUT_EVERY == 11:
        return "validation"
    if index % HELD_OUT_EVERY == 22:
        return "test"
    return "train"


def write_parquet(path, articles, per_group):
    """One parquet file, a row group per `per_group` whole articles."""
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for i in range(0, len(articles), per_group):
            rows = [row for article in articles[i : i + per_group] for row in article]
            writer.write_table(pa.table({"text": pa.array(rows, pa.string())}, schema=schema))
    n_rows = sum(len(a) for a in articles)
    print(f"{path}: {len(articles)} articles, {n_rows} rows, {-(-len(articles) // per_group)} row groups")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    chapters = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines()]
    splits = {"train": [], "validation": [], "test": []}
    for index, chapter in enumerate(chapters):
        splits[split_of(index)].append(article_rows(chapter))
    folder = args.out / CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    for k, articles in enumerate(split_articles(splits["train"], TRAIN_FILES)):
        write_parquet(folder / f"train-{k:05d}-of-{TRAIN_FILES:05d}.parquet", articles, ARTICLES_PER_GROUP)
    for split in ("validation", "test"):
        write_parquet(folder / f"{split}-00000-of-00001.parquet", splits[split], 2)


if __name__ == "__main__":
    main()
