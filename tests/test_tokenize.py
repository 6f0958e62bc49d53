"""Step 2: the GPT-2 tokenizers and the lazy tokenized stream."""

import warnings

import datasets
import numpy as np
import pytest

import lab2_helpers as L
from conftest import WIKI_ROWS, text_stream

EOS = L.EOS_TOKEN_ID
TRICKY = [
    "Hello world",
    "naïve café, Zürich — 東京 and Ελληνικά",
    "emoji 🐳🚢 and 👩‍👩‍👧 family",
    "runs   of    spaces\n\n\n and\ttabs \r\n",
    "numbers 1234567 3.14159 1,000,000 2026-11-25",
    "contractions: I'm, you're, it's, we'll, they'd, don't, O'Neil's",
    "a literal <|endoftext|> inside text",
    " leading and trailing spaces   ",
    "",
]


def ids(row):
    """A tokenized row's ids as a list (tokenize_stream gives int32 arrays)."""
    return row["input_ids"].tolist()


def test_bundled_tokenizer_gives_the_hub_gpt2_ids(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == EOS
    assert len(tokenizer) == 50257


def test_tiktoken_backend_matches_hf_ids_on_tricky_strings(tokenizer, fast_tokenizer):
    hf = tokenizer(TRICKY, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert fast_tokenizer(TRICKY)["input_ids"] == hf
    assert fast_tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert fast_tokenizer.eos_token_id == EOS
    assert fast_tokenizer.decode(hf[2]) == TRICKY[2]


def test_tiktoken_backend_matches_hf_ids_on_the_bundled_sample(tokenizer, fast_tokenizer, sample_rows):
    texts = [r for r in sample_rows if r]
    hf = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert fast_tokenizer(texts)["input_ids"] == hf
    assert sum(map(len, hf)) > 250_000


def test_tiktoken_backend_can_read_special_tokens_when_asked(fast_tokenizer):
    assert fast_tokenizer("a <|endoftext|>", split_special_tokens=False)["input_ids"] == [64, 220, EOS]
    assert EOS not in fast_tokenizer("a <|endoftext|>")["input_ids"]


def test_tokenizer_backend_choices_are_checked():
    with pytest.raises(ValueError, match="tiktoken"):
        L.load_tokenizer(backend="sentencepiece")
    with pytest.raises(ValueError, match="bundled"):
        L.load_tokenizer("gpt2", backend="tiktoken")


def test_wikitext_articles_get_one_eos_each_and_blank_rows_are_skipped(tokenizer):
    rows = list(L.tokenize_stream(text_stream(WIKI_ROWS), tokenizer, layout="wikitext"))
    lines = [r for r in WIKI_ROWS if r]
    assert len(rows) == len(lines)  # blank rows produce nothing
    for text, row in zip(lines, rows):
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        is_title = text.startswith(" = ") and not text.startswith(" = = ")
        assert ids(row) == ([EOS] + plain if is_title else plain)
    assert sum(ids(row).count(EOS) for row in rows) == 2  # two articles; no EOS at the section


def test_rows_without_trailing_newline_are_documents_of_their_own(tokenizer):
    docs = ["First document.", "Second one, longer.", "Third."]
    rows = list(L.tokenize_stream(text_stream(docs), tokenizer))
    assert [ids(r) for r in rows] == [[EOS] + tokenizer(d)["input_ids"] for d in docs]


def test_layout_can_be_forced(tokenizer):
    lines = [" one \n", " two \n"]
    as_rows = list(L.tokenize_stream(text_stream(lines), tokenizer, layout="rows"))
    assert [ids(r)[0] for r in as_rows] == [EOS, EOS]
    as_wiki = list(L.tokenize_stream(text_stream(["Doc one.", "Doc two."]), tokenizer, layout="wikitext"))
    assert all(EOS not in ids(r) for r in as_wiki)
    with pytest.raises(ValueError, match="wikitext"):
        L.tokenize_stream(text_stream(lines), tokenizer, layout="paragraphs")


def test_separate_documents_false_adds_no_eos(tokenizer):
    rows = list(L.tokenize_stream(text_stream(WIKI_ROWS), tokenizer, separate_documents=False))
    assert all(EOS not in ids(r) for r in rows)


def test_literal_endoftext_in_text_is_ordinary_text(tokenizer, fast_tokenizer):
    for tok in (tokenizer, fast_tokenizer):
        (row,) = L.tokenize_stream(text_stream(["say <|endoftext|> twice <|endoftext|>"]), tok)
        assert ids(row).count(EOS) == 1 and ids(row)[0] == EOS  # only the separator


def test_rows_without_text_become_empty_rows_that_the_packer_reports(tokenizer, caplog):
    stream = text_stream(["alpha", None, "", "beta", None])
    rows = list(L.tokenize_stream(stream, tokenizer, separate_documents=False))
    assert [tokenizer.decode(r["input_ids"]) for r in rows] == ["alpha", "", "", "beta", ""]
    with caplog.at_level("WARNING"):
        blocks = list(L.group_texts_streaming(rows, block_size=1))
    assert [tokenizer.decode(b["input_ids"]) for b in blocks] == ["alpha", "beta"]
    (message,) = [r.getMessage() for r in caplog.records if "gave no tokens" in r.getMessage()]
    assert "3 of 5 rows gave no tokens" in message and "the first is row 1" in message


def test_non_string_text_names_the_row_and_column(tokenizer):
    def gen():
        yield from ({"text": t} for t in ["fine", "also fine", 42])

    stream = datasets.IterableDataset.from_generator(gen)
    with pytest.raises(TypeError, match=r"row 2, column 'text': expected a string or None, got int 42"):
        list(L.tokenize_stream(stream, tokenizer))


def test_stream_without_text_column_is_refused_naming_the_columns(tokenizer):
    known = datasets.Dataset.from_dict({"body": ["x"], "id": [1]}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"no 'text' column.*\['body', 'id'\]"):
        L.tokenize_stream(known, tokenizer)
    unknown = datasets.IterableDataset.from_generator(lambda: iter([{"body": "x"}]))
    assert unknown.column_names is None
    with pytest.raises(ValueError, match=r"no 'text' column.*\['body'\]"):
        list(L.tokenize_stream(unknown, tokenizer))  # columns unknown until a row is read
    with pytest.raises(TypeError, match="IterableDataset"):
        L.tokenize_stream([{"text": "x"}], tokenizer)


def test_rows_are_compact_int32_arrays(tokenizer):
    (row,) = L.tokenize_stream(text_stream(["Hello world"]), tokenizer)
    assert row["input_ids"].dtype == np.int32 and ids(row) == [EOS, 15496, 995]


def test_other_columns_are_dropped_with_blank_rows(tokenizer):
    stream = datasets.Dataset.from_dict({"text": ["a", "", "b"], "id": [0, 1, 2]}).to_iterable_dataset()
    rows = list(L.tokenize_stream(stream, tokenizer, layout="wikitext"))
    assert [list(r) for r in rows] == [["input_ids"], ["input_ids"]]


def test_tokenizing_is_lazy(tokenizer):
    def gen():
        raise AssertionError("read a row before iteration")
        yield  # a generator function

    stream = datasets.IterableDataset.from_generator(
        gen, features=datasets.Features({"text": datasets.Value("string")})
    )
    L.tokenize_stream(stream, tokenizer)  # builds the pipeline without reading


def test_long_documents_raise_no_length_warning(tokenizer, capfd):
    text = "word " * 3000  # 3,001 tokens
    bundled_max, tokenizer.model_max_length = tokenizer.model_max_length, 1024  # the Hub's gpt2 has 1024
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (row,) = L.tokenize_stream(text_stream([text]), tokenizer)
    finally:
        tokenizer.model_max_length = bundled_max
    assert len(row["input_ids"]) == 1 + 3001  # EOS + every token: no truncation
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_long_rows_cut_for_threads_give_exactly_the_ids_of_the_whole_row(
    tokenizer, fast_tokenizer, sample_rows
):
    """Rows longer than LONG_ROW_CHARS are cut where GPT-2's pre-tokenizer starts a piece anyway and
    encoded in parallel: the ids equal the whole row's, on the whole book and on tricky text."""
    from streaming_lm.documents import cut_long
    from streaming_lm.encoders import make_encoder

    book = "".join(sample_rows)
    tricky = "".join(TRICKY).replace("<|endoftext|>", "") * 300
    for text in (book, tricky):
        pieces, owner = cut_long([text], size=2000)
        assert len(pieces) > 5 and "".join(pieces) == text and set(owner.tolist()) == {0}
        for tok in (tokenizer, fast_tokenizer):
            encoder = make_encoder(tok)
            assert encoder.cuts_long_rows
            encoded = encoder(pieces)
            ids, _ = encoded.result() if hasattr(encoded, "result") else encoded
            whole = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert ids.tolist() == whole


def test_a_book_in_one_row_streams_the_same_tokens_through_the_cut(fast_tokenizer, sample_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "book.parquet"
    pq.write_table(pa.table({"text": ["".join(sample_rows)]}), path)
    tokens = L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer)
    (row,) = list(tokens)
    expected = [EOS] + fast_tokenizer.encoding.encode_ordinary("".join(sample_rows))
    assert row["input_ids"].tolist() == expected
