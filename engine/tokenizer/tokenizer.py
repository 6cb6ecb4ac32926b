"""`Tokenizer`: the public face of the tokenizer package (text <-> token ids, llama.cpp-exact).

Owns: choosing the algorithm for the vocab type (SPM / BPE / WPM), the BOS/EOS/SEP and
space-prefix rules around special tokens (llama_vocab::impl::tokenize), and the accessors the
engine and server use (special ids, end-of-generation set, FIM ids, pieces).
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from ggserve.engine.tokenizer.bpe import BPEModel
from ggserve.engine.tokenizer.detokenizer import PieceTable, detokenize
from ggserve.engine.tokenizer.special import SpecialSplitter
from ggserve.engine.tokenizer.spm import SPACE_ESCAPE, SPMModel
from ggserve.engine.tokenizer.vocab import (ATTR_CONTROL, ATTR_USER_DEFINED, VOCAB_BPE, VOCAB_SPM, VOCAB_WPM,
                                    Vocab)
from ggserve.engine.tokenizer.wpm import WPMModel

_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_surrogates(text: str) -> str:
    """Lone surrogates (e.g. from broken JSON escapes) cannot be UTF-8; llama.cpp would see
    invalid bytes and use U+FFFD, so do the same up front."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


class Tokenizer:
    """Tokenizer of one GGUF model. Thread-compatible: encode/decode only fill internal caches."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        if vocab.vocab_type == VOCAB_SPM:
            self._model = SPMModel(vocab)
        elif vocab.vocab_type == VOCAB_BPE:
            self._model = BPEModel(vocab)
        else:
            self._model = WPMModel(vocab)
        self._splitter = SpecialSplitter(vocab)
        self._pieces = PieceTable(vocab)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (as `GGUFFile.metadata`); ValueError if unusable."""
        return cls(Vocab.from_metadata(metadata))

    @classmethod
    def from_gguf(cls, g) -> "Tokenizer":
        return cls.from_metadata(g.metadata)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special, parse_special)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        text = _clean_surrogates(text)
        v = self.vocab
        # WordPiece always frames the text as [CLS] ... [SEP]; the others follow add_bos/add_eos
        bos = v.ids["bos"] if add_special and (v.add_bos or v.vocab_type == VOCAB_WPM) else None
        eos = v.ids["sep"] if v.vocab_type == VOCAB_WPM else v.ids["eos"]
        eos = eos if add_special and (v.add_eos or v.vocab_type == VOCAB_WPM) else None
        out: list[int] = [] if bos is None else [bos]
        fragments = self._splitter.partition(text, parse_special)
        if v.vocab_type == VOCAB_SPM:
            self._encode_spm_fragments(fragments, out)
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._model.encode(frag, out)
        if eos is not None:
            out.append(eos)
        return out

    def _encode_spm_fragments(self, fragments: list[int | str], out: list[int]) -> None:
        add_space_prefix = self.vocab.add_space_prefix
        prev_special = True  # the first fragment is treated like text right after a special token
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if add_space_prefix and prev_special:
                frag = " " + frag
            self._model.encode(frag.replace(" ", SPACE_ESCAPE), out)
            prev_special = False

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """llama_detokenize(ids, remove_special=False, unparse_special=special), UTF-8 with
        replacement characters for invalid bytes."""
        return detokenize(self._pieces, ids, special).decode("utf-8", "replace")

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        return self._pieces.piece(int(token_id), special)

    # ------------------------------------------------------------------ vocabulary facts
    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def vocab_type(self) -> str:
        return self.vocab.vocab_type

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        return self.vocab.eog_ids

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.vocab.attrs[token_id] & ATTR_CONTROL)

    def is_user_defined(self, token_id: int) -> bool:
        return bool(self.vocab.attrs[token_id] & ATTR_USER_DEFINED)

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary entry (e.g. "▁Hello", "Ġworld", "<|im_end|>")."""
        return self.vocab.tokens[token_id]

    def find_token(self, text: str) -> int | None:
        return self.vocab.token_to_id.get(text)

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.vocab.ids["eot"]

    @property
    def eom_id(self) -> int | None:
        return self.vocab.ids["eom"]

    @property
    def unk_id(self) -> int | None:
        return self.vocab.ids["unk"]

    @property
    def sep_id(self) -> int | None:
        return self.vocab.ids["sep"]

    @property
    def pad_id(self) -> int | None:
        return self.vocab.ids["pad"]

    @property
    def mask_id(self) -> int | None:
        return self.vocab.ids["mask"]

    @property
    def fim_prefix_id(self) -> int | None:
        return self.vocab.ids["fim_pre"]

    @property
    def fim_suffix_id(self) -> int | None:
        return self.vocab.ids["fim_suf"]

    @property
    def fim_middle_id(self) -> int | None:
        return self.vocab.ids["fim_mid"]

    @property
    def fim_pad_id(self) -> int | None:
        return self.vocab.ids["fim_pad"]

    @property
    def fim_repo_id(self) -> int | None:
        return self.vocab.ids["fim_rep"]

    @property
    def fim_sep_id(self) -> int | None:
        return self.vocab.ids["fim_sep"]

    @property
    def nl_id(self) -> int | None:
        """llama.cpp's newline token: the <0x0A> byte token for SPM, the first id of "\\n" else."""
        if self.vocab.vocab_type == VOCAB_SPM:
            return self.vocab.token_to_id.get("<0x0A>", self.vocab.token_to_id.get("\n"))
        if self.vocab.vocab_type == VOCAB_WPM:
            return self.vocab.ids["pad"]
        ids = self.encode("\n", add_special=False)
        return ids[0] if ids else self.vocab.ids["pad"]

    def __repr__(self) -> str:
        return f"Tokenizer({self.vocab.vocab_type}, pre={self.vocab.pre!r}, n_vocab={self.n_vocab})"


__all__ = ["Tokenizer", "VOCAB_BPE", "VOCAB_SPM", "VOCAB_WPM"]
