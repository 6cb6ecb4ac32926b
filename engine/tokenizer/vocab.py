"""The vocabulary of a GGUF model, built from its metadata exactly the way llama.cpp builds it.

Owns: token texts/scores/attributes, text -> id lookup, the special token ids (BOS, EOS, EOT,
UNK, ..., FIM), the tokenizer flags (add_bos, add_eos, add_space_prefix, clean_spaces, ...),
the end-of-generation set and the list of special tokens that split raw text before
tokenization. llama.cpp reference: `llama_vocab::impl::load` in src/llama-vocab.cpp.

llama.cpp fixes several of these by token text rather than by metadata (EOT/EOM/FIM/EOG tokens,
"unused" control tokens, Phi-3's rstrip flags); those rules are reproduced here on purpose,
because users see their effect in token ids and in when generation stops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ggserve.engine.tokenizer.pretokenizer import pre_type_options

# GGUF token types (tokenizer.ggml.token_type) -> llama.cpp token attribute bits.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
# index = GGUF token type (0 undefined, 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte)
_TYPE_TO_ATTR = np.array(
    [ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE],
    dtype=np.int32,
)

VOCAB_SPM, VOCAB_BPE, VOCAB_WPM = "spm", "bpe", "wpm"
_MODEL_TO_VOCAB = {"llama": VOCAB_SPM, "gpt2": VOCAB_BPE, "bert": VOCAB_WPM}

# Special-token ids llama.cpp assumes when the metadata does not say (per vocab type).
_DEFAULT_IDS = {
    VOCAB_SPM: {"bos": 1, "eos": 2, "unk": 0},
    VOCAB_BPE: {"bos": 11, "eos": 11},
    VOCAB_WPM: {"bos": 101, "unk": 100, "sep": 102, "pad": 0, "mask": 103},
}
# (attribute name, metadata keys in the order llama.cpp reads them; later keys override earlier)
_ID_KEYS = (
    ("bos", ("bos_token_id",)),
    ("eos", ("eos_token_id",)),
    ("eot", ("eot_token_id",)),
    ("eom", ("eom_token_id",)),
    ("unk", ("unknown_token_id",)),
    ("sep", ("seperator_token_id",)),  # sic: the GGUF key is spelled this way
    ("pad", ("padding_token_id",)),
    ("mask", ("mask_token_id",)),
    ("fim_pre", ("fim_pre_token_id", "prefix_token_id")),
    ("fim_suf", ("fim_suf_token_id", "suffix_token_id")),
    ("fim_mid", ("fim_mid_token_id", "middle_token_id")),
    ("fim_pad", ("fim_pad_token_id",)),
    ("fim_rep", ("fim_rep_token_id",)),
    ("fim_sep", ("fim_sep_token_id",)),
)
# Tokens llama.cpp recognises by text when the metadata leaves the id unset (first match wins).
_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Token texts that end generation whatever their type (llama.cpp issue #9606).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss


def _key(metadata: dict[str, Any], name: str, default: Any = None) -> Any:
    return metadata.get("tokenizer.ggml." + name, default)


@dataclass
class Vocab:
    """Everything llama.cpp's `llama_vocab` knows, minus the tokenization algorithms."""

    vocab_type: str  # "spm" | "bpe" | "wpm"
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    scores: np.ndarray  # f32 (n_vocab,)
    attrs: np.ndarray  # int32 (n_vocab,) llama.cpp attribute bits
    merges: list[str] = field(default_factory=list)
    ids: dict[str, int | None] = field(default_factory=dict)  # bos, eos, eot, ..., fim_sep
    add_bos: bool = False
    add_eos: bool = False
    add_sep: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    lowercase: bool = True  # WPM normalizer
    strip_accents: bool = True
    eog_ids: frozenset[int] = frozenset()
    special_ids: tuple[int, ...] = ()  # the special-token cache, longest text first
    token_to_id: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vocab_type not in (VOCAB_SPM, VOCAB_BPE, VOCAB_WPM):
            raise ValueError(f"unsupported vocab type {self.vocab_type!r}")
        if not self.tokens:
            raise ValueError("the vocabulary is empty")
        if len(self.scores) != len(self.tokens) or len(self.attrs) != len(self.tokens):
            raise ValueError("tokenizer scores/token types do not match the number of tokens")

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def attr(self, token_id: int) -> int:
        return int(self.attrs[token_id])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "Vocab":
        model = _key(metadata, "model")
        if model is None:
            raise ValueError("GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in _MODEL_TO_VOCAB:
            raise ValueError(f"unsupported tokenizer model {model!r} (supported: llama, gpt2, bert)")
        vocab_type = _MODEL_TO_VOCAB[model]
        tokens = _key(metadata, "tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("tokenizer.ggml.tokens is missing or not a string array")
        n = len(tokens)
        # llama.cpp renames empty token texts so that text -> id stays unambiguous
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

        scores = _key(metadata, "scores")
        scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
        if len(scores) < n:
            raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        types = _key(metadata, "token_type")
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, np.int32)
        else:
            types = np.asarray(types, np.int64)
            if len(types) < n:
                raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
            types = types[:n]
            attrs = np.where((types >= 0) & (types < len(_TYPE_TO_ATTR)),
                             _TYPE_TO_ATTR[np.clip(types, 0, len(_TYPE_TO_ATTR) - 1)], ATTR_UNDEFINED)
            attrs = attrs.astype(np.int32)

        pre = _key(metadata, "pre") or "default"
        v = cls(vocab_type=vocab_type, pre=pre, tokens=tokens, scores=scores[:n], attrs=attrs,
                token_to_id=dict(zip(tokens, range(n))))
        v._load_flags(metadata)
        if vocab_type == VOCAB_BPE:
            merges = _key(metadata, "merges")
            if not isinstance(merges, list):
                raise ValueError("BPE tokenizer without tokenizer.ggml.merges")
            v.merges = merges
        v._load_special_ids(metadata)
        v._fix_attrs_by_text()
        v._build_eog()
        v._build_special_cache()
        v._apply_model_quirks(str(metadata.get("general.name") or ""),
                              str(metadata.get("general.architecture") or ""))
        return v

    def _load_flags(self, metadata: dict[str, Any]) -> None:
        if self.vocab_type == VOCAB_BPE:
            opts = pre_type_options(self.pre)  # raises ValueError for unknown pre-tokenizers
            self.add_space_prefix = False
            self.clean_spaces = opts.clean_spaces
            self.ignore_merges = opts.ignore_merges
            self.add_bos = opts.add_bos
        elif self.vocab_type == VOCAB_SPM:
            self.add_space_prefix, self.clean_spaces, self.add_bos = True, False, True
        else:  # WPM
            self.clean_spaces, self.add_bos, self.add_sep = True, True, True
        self.add_space_prefix = bool(_key(metadata, "add_space_prefix", self.add_space_prefix))
        self.add_bos = bool(_key(metadata, "add_bos_token", self.add_bos))
        self.add_eos = bool(_key(metadata, "add_eos_token", self.add_eos))
        self.add_sep = bool(_key(metadata, "add_sep_token", self.add_sep))
        self.lowercase = bool(_key(metadata, "normalizer.lowercase", True))
        self.strip_accents = bool(_key(metadata, "normalizer.strip_accents", self.lowercase))

    def _load_special_ids(self, metadata: dict[str, Any]) -> None:
        n = self.n_vocab
        ids: dict[str, int | None] = {name: None for name, _ in _ID_KEYS}
        for name, value in _DEFAULT_IDS[self.vocab_type].items():
            ids[name] = value if value < n else None  # out-of-range defaults are disabled
        if self.vocab_type == VOCAB_BPE and self.pre in ("glm4", "chatglm-bpe"):
            ids["bos"] = None
        for name, keys in _ID_KEYS:
            for key in keys:
                value = _key(metadata, key)
                if value is None:
                    continue
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                    raise ValueError(f"tokenizer.ggml.{key} must be an integer, got {value!r}")
                if 0 <= int(value) < n:  # llama.cpp keeps the default for out-of-range ids
                    ids[name] = int(value)
        for name, texts in _BY_TEXT.items():
            if ids[name] is not None:
                continue
            for text in texts:
                token_id = self.token_to_id.get(text)
                if token_id is not None:
                    ids[name] = token_id
                    self.attrs[token_id] |= ATTR_CONTROL
                    break
        self.ids = ids
        if self.add_bos and ids["bos"] is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true but the vocabulary has no BOS token")
        if self.add_eos and ids["eos"] is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true but the vocabulary has no EOS token")
        if self.add_sep and ids["sep"] is None:
            raise ValueError("tokenizer.ggml.add_sep_token is true but the vocabulary has no SEP token")

    def _fix_attrs_by_text(self) -> None:
        # control tokens whose text says "unused" are also marked unused (llama.cpp does this)
        for token_id in np.nonzero(self.attrs & ATTR_CONTROL)[0]:
            if "unused" in self.tokens[token_id]:
                self.attrs[token_id] |= ATTR_UNUSED

    def _build_eog(self) -> None:
        ids, eog = self.ids, set()
        for name in ("fim_pad", "fim_rep", "fim_sep"):
            if ids[name] is not None:
                eog.add(ids[name])
        for text in _EOG_TEXTS:
            token_id = self.token_to_id.get(text)
            if token_id is not None:
                eog.add(token_id)
                self.attrs[token_id] |= ATTR_CONTROL
        for text in _ALWAYS_RENDERED:
            token_id = self.token_to_id.get(text)
            if token_id is not None:
                self.attrs[token_id] = ATTR_USER_DEFINED
        for name in ("eos", "eot", "eom"):
            if ids[name] is not None:
                eog.add(ids[name])
        texts = {self.tokens[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])
            self.attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        # gemma4 / paddleocr: "</s>" is an ordinary token there
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])
            self.attrs[texts["</s>"]] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)

    def _build_special_cache(self) -> None:
        mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
        special = np.nonzero(self.attrs & mask)[0].tolist()
        # longest (in UTF-8 bytes) first, so that e.g. "<|im_start|>" wins over "<|im"
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8", "surrogateescape")))
        self.special_ids = tuple(special)

    def _apply_model_quirks(self, model_name: str, architecture: str) -> None:
        name = model_name.lower()

        def set_attr(text: str, bit: int, value: bool) -> None:
            token_id = self.token_to_id.get(text)
            if token_id is not None:
                self.attrs[token_id] = (self.attrs[token_id] | bit) if value else (self.attrs[token_id] & ~bit)

        if any(s in self.pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
                s in architecture for s in ("nomic-bert-moe", "jina-bert-v3")):
            set_attr("<mask>", ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            # Phi-3 strips whitespace after its special tokens ("<|user|>\n" -> "<|user|>")
            for token_id in self.special_ids:
                self.attrs[token_id] |= ATTR_RSTRIP
            set_attr("</s>", ATTR_RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                set_attr(text, ATTR_RSTRIP, False)
        elif "modern-bert" in name:
            set_attr("[MASK]", ATTR_LSTRIP, True)
