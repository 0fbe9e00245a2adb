"""The data pipeline: readers, cleaning, de-duplication, split, tokenizer, token files, packing, prepare."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from fastllm.data import (DEFAULT_SPECIAL_TOKENS, EOT_TOKEN, TokenDataset, clean_documents, corpus_files, decode,
                          deduplicate, default_corpus_files, encode, find_duplicates, load_meta, load_tokenizer,
                          normalize_text, prepare_dataset, read_corpus, save_tokenizer, split_documents,
                          token_dtype, train_tokenizer, write_tokens)
from fastllm.data.dedup import MinHasher

REPO = Path(__file__).resolve().parents[2]


def random_docs(n, words_per_doc=300, seed=0, vocab=5000):
    """Distinct documents of random words: pairwise shingle overlap is essentially zero."""
    rng = np.random.default_rng(seed)
    lexicon = [f"w{i}x{(i * 7919) % 997}" for i in range(vocab)]
    return [" ".join(lexicon[j] for j in rng.integers(0, vocab, words_per_doc)) for _ in range(n)]


def change_words(doc, positions, new_word="CHANGED"):
    words = doc.split()
    for p in positions:
        words[p] = f"{new_word}{p}"
    return " ".join(words)


# ----------------------------------------------------------------------------------------------- readers

def test_read_text_file_and_separator(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\n\nSEP\nsecond doc\n", encoding="utf-8")
    assert read_corpus(f) == ["first doc\n\nSEP\nsecond doc\n"]
    assert read_corpus(f, separator="SEP") == ["first doc\n\n", "\nsecond doc\n"]


def test_read_folder_recursive_sorted_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed")
    (tmp_path / "a.md").write_text("alpha")
    (tmp_path / "c.txt").write_text("gamma")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("git internals")
    (tmp_path / "d.jsonl").write_text('{"text": "from jsonl"}\n')
    assert read_corpus(tmp_path) == ["alpha", "zed", "gamma", "from jsonl"]  # sorted by path: a.md, b/z.txt, ...
    assert read_corpus(tmp_path, extensions=["txt"]) == ["zed", "gamma"]
    assert read_corpus(tmp_path, max_docs=2) == ["alpha", "zed"]
    assert [p.name for p in corpus_files(tmp_path, extensions=[".md", ".jsonl"])] == ["a.md", "d.jsonl"]


def test_read_jsonl_fields_and_errors(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "héllo", "body": "b1"}\n\n{"text": "wörld", "body": "b2"}\n', encoding="utf-8")
    assert read_corpus(f) == ["héllo", "wörld"]
    assert read_corpus(f, text_field="body") == ["b1", "b2"]
    with pytest.raises(ValueError, match=r"data\.jsonl:1: .*'content'"):
        read_corpus(f, text_field="content")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_corpus(bad)
    notstr = tmp_path / "num.jsonl"
    notstr.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="must be a string, got int"):
        read_corpus(notstr)


def test_missing_path_and_empty_corpus(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_corpus(missing)
    with pytest.raises(ValueError, match="empty corpus"):
        read_corpus(tmp_path)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match=r"empty corpus.*\['\.rst'\]"):
        read_corpus(tmp_path, extensions=[".rst"])
    with pytest.raises(ValueError, match="max_bytes"):
        read_corpus(tmp_path, max_bytes=0)


def test_default_corpus_is_real_python_source():
    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert all(p.suffix == ".py" and stdlib in p.parents for p in files)
    assert not any({"site-packages", "test", "tests"} & set(p.relative_to(stdlib).parts) for p in files)
    assert files == default_corpus_files()  # fixed order
    docs = read_corpus(max_bytes=200_000)
    n_bytes = sum(len(d.encode("utf-8", errors="surrogateescape")) for d in docs)
    assert n_bytes >= 200_000 and n_bytes - len(docs[-1].encode("utf-8", errors="surrogateescape")) < 200_000
    text = "\n".join(docs)
    assert "def " in text and "import " in text and "return" in text
    # The hashed order samples across the library, not just the first package alphabetically.
    assert len({p.relative_to(stdlib).parts[0] for p in files[:len(docs)]}) > 5


# ------------------------------------------------------------------------------------------------ cleaning

def test_clean_drops_binary_undecodable_and_short(tmp_path):
    good = "def f(x):\n    return x + 1  \r\n\r\n\r\n\r\n\r\n# caf\u0065\u0301 ok" + " pad" * 20
    (tmp_path / "good.py").write_text(good, encoding="utf-8", newline="")
    (tmp_path / "nul.bin").write_bytes(b"\x00\x01\x02ELF" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 20)  # not UTF-8
    (tmp_path / "short.txt").write_text("   tiny \n\n")
    docs = read_corpus(tmp_path)
    assert len(docs) == 4
    stats = {}
    cleaned = clean_documents(docs, min_chars=32, stats=stats)
    assert stats == {"dropped_binary": 2, "dropped_short": 1}
    assert cleaned == [normalize_text(good)]
    out = cleaned[0]
    assert out.startswith("def f(x):\n    return x + 1\n\n\n# café ok")  # indentation kept, trailing space gone
    assert "\r" not in out and "\n\n\n\n" not in out
    assert "caf\u00e9" in out and "e\u0301" not in out  # NFC
    with pytest.raises(ValueError, match="min_chars"):
        clean_documents(["x"], min_chars=-1)


def test_normalize_text_details():
    assert normalize_text("\ufeff\n\nline  \t\nnext\n\n") == "line\nnext"
    assert normalize_text("a\n\n\n\n\n\nb") == "a\n\n\nb"
    assert normalize_text("\tindented\n    more") == "\tindented\n    more"


# -------------------------------------------------------------------------------------------------- dedup

def test_dedup_removes_planted_exact_and_near_duplicates():
    base = random_docs(12)
    exact = "  " + base[3].replace(" ", "\n", 5) + "\n"  # same text up to whitespace
    near = change_words(base[7], [10, 100, 200])          # 3 of 300 words changed
    far = change_words(base[5], range(0, 300, 2))         # half the words changed: a different document
    docs = base + [exact, near, far]
    dups = find_duplicates(docs)
    assert [(d.index, d.original, d.kind) for d in dups] == [(12, 3, "exact"), (13, 7, "near")]
    assert dups[1].similarity >= 0.8
    stats = {}
    kept = deduplicate(docs, stats=stats)
    assert kept == base + [far]
    assert stats == {"exact_duplicates": 1, "near_duplicates": 1}
    assert deduplicate(docs, near=False) == base + [near, far]
    assert find_duplicates(docs) == dups  # deterministic
    # A stricter threshold keeps the near duplicate.
    assert [d.kind for d in find_duplicates(docs, threshold=0.99)] == ["exact"]


def test_dedup_keeps_distinct_docs_and_short_ones():
    docs = random_docs(50, seed=1) + ["a b", "a c", "!!!", "???"]
    dups = find_duplicates(docs)
    assert dups == []
    with pytest.raises(ValueError, match="bands must divide num_perm"):
        find_duplicates(docs, bands=7)
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(docs, threshold=0)


def test_minhash_estimates_jaccard_and_ignores_hash_seed():
    hasher = MinHasher(num_perm=256, shingle_size=3)
    a = random_docs(1, words_per_doc=400, seed=3)[0]
    b = change_words(a, range(0, 400, 8))
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    jaccard = len(sa & sb) / len(sa | sb)
    estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
    assert 0.2 < jaccard < 0.8
    assert abs(estimate - jaccard) < 4 * np.sqrt(jaccard * (1 - jaccard) / 256)  # 4 standard errors
    # Same signature in a process with a different str hash seed.
    code = ("from fastllm.data.dedup import MinHasher; import sys; "
            "print(MinHasher(num_perm=256, shingle_size=3).signature(sys.stdin.read()).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], input=a, capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == hasher.signature(a).tolist()


# -------------------------------------------------------------------------------------------------- split

def test_split_by_document_is_deterministic():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert len(split_documents(docs[:3], 0.01)[1]) == 1  # at least one validation document
    assert split_documents(docs, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="cannot split 1 document"):
        split_documents(docs[:1], 0.5)


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    docs = read_corpus(max_bytes=150_000) + ["héllo wörld, 日本語のテキスト, emoji 😀 🚀"] * 5
    return train_tokenizer(docs, vocab_size=600)


UNICODE_TEXTS = [
    "def f(x):\n    return x  # done\n",
    "  leading spaces\t\ttabs\r\nCRLF\n\n\n",
    "héllo wörld — “quotes” naïve café e\u0301 (combining)",
    "日本語のテキスト, 한국어, العربية, emoji 😀🚀👩‍👩‍👧",
    "\x00\x07 control chars \ufeff bom \U0010ffff",
    "",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = encode(tokenizer, text)
    assert decode(tokenizer, ids) == text
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)


def test_tokenizer_special_tokens(tokenizer, tmp_path):
    assert tokenizer.get_vocab_size() <= 600
    assert set(DEFAULT_SPECIAL_TOKENS) >= {"<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    for i, tok in enumerate(DEFAULT_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i
        assert encode(tokenizer, tok) == [i]
    chat = "<|user|>hi<|end|><|assistant|>hello<|end|>"
    ids = encode(tokenizer, chat)
    assert ids[0] == tokenizer.token_to_id("<|user|>") and ids.count(tokenizer.token_to_id("<|end|>")) == 2
    assert decode(tokenizer, ids) == chat and decode(tokenizer, ids, skip_special=True) == "hihello"
    # Raw documents: a special-token string is plain text, never the separator.
    as_text = encode(tokenizer, "a <|endoftext|> b", allow_special=False)
    assert tokenizer.token_to_id(EOT_TOKEN) not in as_text
    assert decode(tokenizer, as_text) == "a <|endoftext|> b"
    assert encode(tokenizer, EOT_TOKEN) == [0]  # the flag was restored
    # Save / load.
    path = save_tokenizer(tokenizer, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = load_tokenizer(path)
    assert encode(loaded, UNICODE_TEXTS[3]) == encode(tokenizer, UNICODE_TEXTS[3])
    assert load_tokenizer(tmp_path).get_vocab_size() == tokenizer.get_vocab_size()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("bad", [100, 261, 4.5, True, "4096", 2**40])
def test_tokenizer_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=bad)


def test_tokenizer_empty_corpus():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=512)


# ----------------------------------------------------------------------------------------- token files

def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_write_tokens_contents(tokenizer, tmp_path):
    docs = ["first document", "second: 😀 and a literal <|endoftext|> inside", "third"]
    n = write_tokens(docs, tokenizer, tmp_path / "t.bin", batch_docs=2)
    arr = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    expected = sum((encode(tokenizer, d, allow_special=False) + [eot] for d in docs), [])
    assert n == len(arr) == len(expected) and arr.tolist() == expected
    assert int((arr == eot).sum()) == len(docs)
    ds = TokenDataset(tmp_path / "t.bin", seq_len=4, dtype=np.uint16)
    assert ds.tokens.dtype == np.uint16 and isinstance(ds.tokens, np.memmap) and ds.num_tokens == n


# ------------------------------------------------------------------------------------------ TokenDataset

def make_token_file(tmp_path, n_tokens, dtype=np.uint16, write_meta=True):
    tokens = (np.arange(n_tokens, dtype=np.int64) * 7919 + 3) % np.iinfo(dtype).max
    path = tmp_path / "train.bin"
    tokens.astype(dtype).tofile(path)
    if write_meta:
        (tmp_path / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name}))
    return path, tokens


def test_dataset_windows_and_shift(tmp_path):
    path, tokens = make_token_file(tmp_path, 1001)
    ds = TokenDataset(path, seq_len=10)
    assert len(ds) == 100 and ds.dtype == np.uint16
    x, y = ds.batch(0, 8)
    assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == torch.int64
    ids = ds.sequence_ids(0, 8)
    for row, s in zip(range(8), ids):
        assert x[row].tolist() == tokens[s * 10:s * 10 + 10].tolist()
        assert y[row].tolist() == tokens[s * 10 + 1:s * 10 + 11].tolist()


def test_dataset_uint32(tmp_path):
    path, tokens = make_token_file(tmp_path, 300, dtype=np.uint32, write_meta=False)
    ds = TokenDataset(path, seq_len=7, dtype=np.uint32)
    assert len(ds) == 42
    x, _ = ds.batch(0, 42)  # the whole epoch
    assert x.max() > 65535
    assert sorted(x[:, 0].tolist()) == sorted(tokens[0:294:7].tolist())


def test_dataset_deterministic_and_epoch_covering(tmp_path):
    path, _ = make_token_file(tmp_path, 1001)
    a, b = TokenDataset(path, seq_len=10), TokenDataset(path, seq_len=10)
    for index in (0, 3, 12, 57):
        xa, ya = a.batch(index, 8)
        xb, yb = b.batch(index, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(TokenDataset(path, seq_len=10, seed=1).batch(0, 8)[0], a.batch(0, 8)[0])
    # Batches 0..24 of size 4 are exactly one epoch: every sequence once.
    epoch0 = np.concatenate([a.sequence_ids(i, 4) for i in range(25)])
    assert sorted(epoch0.tolist()) == list(range(100))
    assert epoch0.tolist() != list(range(100))  # shuffled


def test_dataset_wraps_around_with_new_permutation(tmp_path):
    path, _ = make_token_file(tmp_path, 1001)
    ds = TokenDataset(path, seq_len=10)
    epoch1 = np.concatenate([ds.sequence_ids(i, 4) for i in range(25, 50)])
    epoch0 = np.concatenate([ds.sequence_ids(i, 4) for i in range(25)])
    assert sorted(epoch1.tolist()) == list(range(100)) and epoch1.tolist() != epoch0.tolist()
    # A batch straddling the boundary: positions 96..103 = last 4 of epoch 0, first 4 of epoch 1.
    assert ds.sequence_ids(12, 8).tolist() == epoch0[96:].tolist() + epoch1[:4].tolist()
    far = ds.batch(10_000, 8)  # far past the end: still valid
    assert far[0].shape == (8, 10)


@pytest.mark.parametrize("world_size", [2, 3])
def test_dataset_rank_shards(tmp_path, world_size):
    path, _ = make_token_file(tmp_path, 1001)
    ds = TokenDataset(path, seq_len=10)
    for index in (0, 5, 16, 33):  # 16 and 33 cross an epoch boundary (100 sequences) for world_size 3 / 2
        shards = [ds.batch(index, 4, rank=r, world_size=world_size) for r in range(world_size)]
        full = ds.batch(index, 4 * world_size)
        assert torch.equal(torch.cat([s[0] for s in shards]), full[0])
        assert torch.equal(torch.cat([s[1] for s in shards]), full[1])
    for index in (0, 5, 7):  # within epoch 0 the shards are disjoint
        ids = [set(ds.sequence_ids(index, 4, rank=r, world_size=world_size).tolist()) for r in range(world_size)]
        assert sum(map(len, ids)) == 4 * world_size == len(set().union(*ids))
    # Over one epoch the ranks together see every sequence once.
    steps = 100 // (4 * world_size)
    seen = [s for i in range(steps) for r in range(world_size)
            for s in ds.sequence_ids(i, 4, rank=r, world_size=world_size).tolist()]
    assert len(seen) == len(set(seen)) == steps * 4 * world_size
    with pytest.raises(ValueError, match="rank"):
        ds.batch(0, 4, rank=world_size, world_size=world_size)


def test_dataset_eval_batches(tmp_path):
    path, tokens = make_token_file(tmp_path, 1001)
    ds = TokenDataset(path, seq_len=10)
    batches = list(ds.eval_batches(16))
    assert len(batches) == 6  # 100 // 16 full batches
    x = torch.cat([b[0] for b in batches])
    assert x[:, 0].tolist() == tokens[0:960:10].tolist()  # in file order
    assert len(list(ds.eval_batches(16, max_batches=2))) == 2
    r0 = list(ds.eval_batches(8, rank=0, world_size=2))
    r1 = list(ds.eval_batches(8, rank=1, world_size=2))
    assert len(r0) == len(r1) == 6
    assert all(torch.equal(torch.cat([a[0], b[0]]), c[0]) for a, b, c in zip(r0, r1, batches))
    with pytest.raises(ValueError, match="fewer than one evaluation batch"):
        list(ds.eval_batches(101))


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.bin"):
        TokenDataset(tmp_path / "nothere.bin", seq_len=8)
    path, _ = make_token_file(tmp_path, 100)
    with pytest.raises(ValueError, match=r"seq_len=100 is larger than the data.*100 tokens"):
        TokenDataset(path, seq_len=100)
    TokenDataset(path, seq_len=99)  # exactly one sequence fits
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TokenDataset(path, seq_len=0)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ValueError, match="no meta.json"):
        TokenDataset(path, seq_len=8)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        TokenDataset(odd, seq_len=1, dtype=np.uint16)
    with pytest.raises(ValueError, match="batch_size"):
        TokenDataset(path, seq_len=8, dtype=np.uint16).batch(0, 0)


# ---------------------------------------------------------------------------------------------- prepare

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    meta = prepare_dataset(out, max_bytes=400_000, vocab_size=512, val_fraction=0.1, seed=0, show_progress=False)
    return out, meta


def test_prepare_default_corpus(prepared):
    out, meta = prepared
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    assert load_meta(out) == meta
    c = meta["counts"]
    assert c["docs_read"] == (c["dropped_binary"] + c["dropped_short"] + c["exact_duplicates"]
                              + c["near_duplicates"] + c["docs_kept"])
    assert c["docs_kept"] == c["train_docs"] + c["val_docs"] and c["val_docs"] >= 1
    assert c["bytes_read"] >= 400_000
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512 and meta["eot_id"] == 0
    tok = load_tokenizer(out / "tokenizer.json")
    for split in ("train", "val"):
        arr = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert len(arr) == c[f"{split}_tokens"] > 0
        assert int((arr == meta["eot_id"]).sum()) == c[f"{split}_docs"] and arr[-1] == meta["eot_id"]
        assert arr.max() < meta["vocab_size"]
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    first = decode(tok, train[:int(np.argmax(train == meta["eot_id"]))])
    assert first == normalize_text(first) and len(first) >= 64 and ("def " in first or "import " in first)
    ds = TokenDataset(out / "train.bin", seq_len=64)  # dtype from meta.json
    x, y = ds.batch(0, 4)
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])


def test_prepare_is_deterministic(prepared, tmp_path):
    out, meta = prepared
    again = prepare_dataset(tmp_path, max_bytes=400_000, vocab_size=512, val_fraction=0.1, seed=0, show_progress=False)
    assert again["counts"] == meta["counts"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_prepare_counts_planted_duplicates(tmp_path):
    base = random_docs(20, seed=5)
    docs = base + [base[2], change_words(base[9], [50, 150]), "short", "bin\x00ary" * 30]
    meta = prepare_dataset(tmp_path, docs, vocab_size=400, val_fraction=0.1, show_progress=False)
    c = meta["counts"]
    assert (c["docs_read"], c["exact_duplicates"], c["near_duplicates"], c["dropped_short"], c["dropped_binary"]) == \
        (24, 1, 1, 1, 1)
    assert c["docs_kept"] == 20 and (c["train_docs"], c["val_docs"]) == (18, 2)
    capped = prepare_dataset(tmp_path / "capped", docs, vocab_size=400, max_docs=5, show_progress=False)
    assert capped["counts"]["docs_read"] == 5


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_dataset(tmp_path / "a", vocab_size=10, show_progress=False)
    assert not (tmp_path / "a").exists()  # failed before touching the disk
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        prepare_dataset(tmp_path / "b", tmp_path / "no_such_corpus", show_progress=False)
    with pytest.raises(ValueError, match="empty corpus after cleaning"):
        prepare_dataset(tmp_path / "c", ["tiny", "docs"], show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_dataset(tmp_path / "d", empty, show_progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(tmp_path / "e", ["x" * 100], val_fraction=1.5, show_progress=False)
