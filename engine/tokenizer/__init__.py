"""Tokenizers that reproduce llama.cpp exactly: SPM, byte-level BPE (with llama.cpp's
pre-tokenizers), WPM, special-token handling and UTF-8-safe detokenization.

Public API: `Tokenizer` (from_gguf / from_metadata, encode, decode, token_to_piece, special
ids, EOG set) and `IncrementalDetokenizer`.
"""
from ggserve.engine.tokenizer.detokenizer import IncrementalDetokenizer
from ggserve.engine.tokenizer.tokenizer import Tokenizer
from ggserve.engine.tokenizer.vocab import Vocab

__all__ = ["Tokenizer", "IncrementalDetokenizer", "Vocab"]
