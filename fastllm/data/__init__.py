"""The data pipeline: corpus -> clean -> de-duplicate -> split -> BPE tokenizer -> packed token files.

    from fastllm.data import prepare_dataset, TokenDataset
    meta = prepare_dataset("data/stdlib")                     # the embedded default corpus
    train = TokenDataset("data/stdlib/train.bin", seq_len=256)
    x, y = train.batch(step, batch_size=16, rank=rank, world_size=world_size)
"""
from .clean import clean_documents, is_binary, normalize_text
from .corpus import corpus_files, default_corpus_files, iter_corpus, read_corpus
from .dataset import META_FILE, TokenDataset, token_dtype, write_tokens
from .dedup import Duplicate, MinHasher, deduplicate, exact_key, find_duplicates
from .prepare import load_meta, prepare_dataset
from .split import split_documents
from .tokenizer import (DEFAULT_SPECIAL_TOKENS, EOT_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, decode, encode, encode_batch,
                        load_tokenizer, save_tokenizer, special_token_id, train_tokenizer)

__all__ = [
    "read_corpus", "iter_corpus", "corpus_files", "default_corpus_files",
    "clean_documents", "normalize_text", "is_binary",
    "deduplicate", "find_duplicates", "Duplicate", "MinHasher", "exact_key",
    "split_documents",
    "train_tokenizer", "save_tokenizer", "load_tokenizer", "encode", "encode_batch", "decode", "special_token_id",
    "DEFAULT_SPECIAL_TOKENS", "SPECIAL_TOKENS", "EOT_TOKEN", "PAD_TOKEN",
    "TokenDataset", "write_tokens", "token_dtype", "META_FILE",
    "prepare_dataset", "load_meta",
]
