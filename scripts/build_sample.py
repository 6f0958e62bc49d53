"""Build the bundled offline sample: Moby-Dick in the WikiText-103 row layout.

    python scripts/build_sample.py [--source ../shared/corpus/moby_dick.jsonl]

Reads one JSON object per chapter (`id`, `chapter`, `title`, `text`, paragraphs
separated by a blank line) and writes `data/wikitext_sample/train-0000K-of-00006.parquet`:
a single `text` column whose rows look like the Hub's `wikitext-103-v1` rows:

    ''                                      <- blank rows are empty strings
    ' = Chapter 1 : Loomings = \\n'          <- an article starts at a top-level heading
    ''
    ' Call me Ishmael . ... \\n'              <- one row per line, trailing "\\n" kept
    ' = = Book I ( Folio ) = = \\n'           <- sections (only where the book has them)

One article per chapter: 138 articles, 3,025 rows (2,743 not blank), 299,543 GPT-2 tokens
with one EOS per article.
The articles are split, in reading order, into 6 parquet files of about equal
size: 6 shards let 1, 2, 3 or 6 DataLoader workers / ranks share the work.
The text is public domain (see data/wikitext_sample/README.md); running the
script twice writes the same rows.
"""

import argparse
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "corpus" / "moby_dick.jsonl"
OUT_DIR = ROOT / "data" / "wikitext_sample"
N_SHARDS = 6  # parquet files; divisible by 1, 2, 3 and 6 workers/ranks

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    chapters = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines()]
    articles = [article_rows(ch) for ch in chapters]
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("train-*.parquet"):
        old.unlink()
    for k, shard in enumerate(split_articles(articles, N_SHARDS)):
        rows = [row for article in shard for row in article]
        path = args.out / f"train-{k:05d}-of-{N_SHARDS:05d}.parquet"
        pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), path)
        print(f"{path}: {len(shard)} articles, {len(rows)} rows")


if __name__ == "__main__":
    main()
