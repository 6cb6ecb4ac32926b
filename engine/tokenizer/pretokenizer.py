"""BPE pre-tokenizers: split text into words the way llama.cpp does for each `tokenizer.ggml.pre`.

Owns: the table of pre-tokenizer types (regex list + the flags llama.cpp ties to each type) and
`PreTokenizer.split`, which applies the regexes in sequence (each one splits every piece the
previous ones produced, keeping unmatched gaps as pieces of their own).

Why the regexes run on a "view" of the text: llama.cpp (src/unicode.cpp) runs std::regex either
on a collapsed text (one byte per code point, unicode categories -> marker bytes) or on a wide
string, and in both cases first replaces every non-ASCII whitespace code point by \\x0B. Its
categories (\\p{L}, \\p{N}, \\p{P}, whitespace) come from tables generated with the `regex`
package, so running the `regex` package on the same whitespace-replaced view gives the same
pieces, code point for code point. Its hand-written gpt2/llama3 splitters are equivalent to the
original regexes (plus a trailing `\\s+` alternative for gpt2, which is how the custom code ends),
so they are written here as regexes too. One deliberate reproduction: ranges in the regexes
that contain non-ASCII whitespace (deepseek-llm's "　-。") never match that whitespace, because
llama.cpp replaced it first.
"""
from __future__ import annotations

from dataclasses import dataclass

import regex

_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = _CONTRACTIONS + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# written with escapes: several range ends (U+1F7D, U+1FBE, U+2126, U+212A, ...) have canonical
# singletons that an editor's NFC normalisation would silently change
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)

# pre-tokenizer family -> regexes applied in order (llama.cpp's llm_tokenizer_bpe constructor)
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-llm": (r"[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + r"]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+\Z", _CJK,
                     r"\p{N}+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "chatglm4": (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    # upper/lower-case runs via lookaheads; std::regex and `regex` agree on them (non-ASCII letters
    # match both [^a-z] and [^A-Z] in either engine)
    "tekken": (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
               r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt4o": (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS_ANY_CASE + "?"
              r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS_ANY_CASE + "?"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "seed-coder": (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
}


@dataclass(frozen=True)
class PreTypeOptions:
    """What llama.cpp derives from `tokenizer.ggml.pre` besides the regexes."""

    family: str  # key into _REGEXES
    clean_spaces: bool = True  # detokenizer removes " ," " ." ... (clean_up_tokenization_spaces)
    ignore_merges: bool = False  # a word that is already a token is emitted whole
    add_bos: bool = False  # default for tokenizer.ggml.add_bos_token


_LLAMA3_OPTS = PreTypeOptions("llama3", ignore_merges=True, add_bos=True)
_PRE_TYPES: dict[str, PreTypeOptions] = {
    "default": PreTypeOptions("default"),
    **{name: _LLAMA3_OPTS for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                       "midm-2.0", "lfm2", "jina-v5-nano")},
    "dbrx": PreTypeOptions("llama3"),
    "smaug-bpe": PreTypeOptions("llama3"),
    "deepseek-llm": PreTypeOptions("deepseek-llm", clean_spaces=False),
    "deepseek-coder": PreTypeOptions("deepseek-coder", clean_spaces=False),
    "falcon": PreTypeOptions("falcon"),
    "mpt": PreTypeOptions("gpt2"),
    "olmo": PreTypeOptions("gpt2"),
    "jais": PreTypeOptions("gpt2"),
    "exaone4": PreTypeOptions("gpt2"),
    **{name: PreTypeOptions("gpt2") for name in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                                 "jina-v2-de", "a.x-4.0", "mellum", "modern-bert")},
    "trillion": PreTypeOptions("gpt2", clean_spaces=False),
    "granite-docling": PreTypeOptions("gpt2", clean_spaces=False),
    "starcoder": PreTypeOptions("starcoder"),
    "refact": PreTypeOptions("starcoder"),
    "codeshell": PreTypeOptions("starcoder"),
    "exaone": PreTypeOptions("starcoder"),
    "minerva-7b": PreTypeOptions("starcoder"),
    "mellum2": PreTypeOptions("starcoder"),
    "command-r": PreTypeOptions("starcoder", clean_spaces=False),
    "smollm": PreTypeOptions("starcoder", clean_spaces=False),
    **{name: PreTypeOptions("qwen2", clean_spaces=False) for name in ("qwen2", "deepseek-r1-qwen", "kormo",
                                                                      "f2llmv2", "hunyuan", "solar-open")},
    "qwen35": PreTypeOptions("qwen35", clean_spaces=False),
    "stablelm2": PreTypeOptions("qwen2"),
    "megrez": PreTypeOptions("qwen2"),
    "poro-chat": PreTypeOptions("bloom", clean_spaces=False),
    "bloom": PreTypeOptions("bloom"),
    "gpt3-finnish": PreTypeOptions("bloom"),
    "viking": PreTypeOptions("viking", clean_spaces=False),
    "glm4": PreTypeOptions("chatglm4"),
    "chatglm-bpe": PreTypeOptions("chatglm4"),
    "seed-coder": PreTypeOptions("seed-coder", clean_spaces=False),
    "tekken": PreTypeOptions("tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **{name: PreTypeOptions("gpt4o", clean_spaces=False) for name in ("gpt-4o", "llama4", "kanana2", "talkie",
                                                                      "minimax-m2")},
}

# non-ASCII code points that llama.cpp's regex layer sees as \x0B (its whitespace fallback)
_NON_ASCII_WHITESPACE = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
                        "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_VIEW = str.maketrans({c: "\x0b" for c in _NON_ASCII_WHITESPACE})


def pre_type_options(pre: str) -> PreTypeOptions:
    """Options for a `tokenizer.ggml.pre` value; ValueError for the ones not implemented."""
    try:
        return _PRE_TYPES[pre]
    except KeyError:
        raise ValueError(f"unsupported BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                         f"{', '.join(sorted(_PRE_TYPES))}") from None


class PreTokenizer:
    """Splits raw text into the words BPE merges are applied to (UTF-8 text, not byte-encoded)."""

    def __init__(self, pre: str):
        self.pre = pre
        self.options = pre_type_options(pre)
        self._patterns = [regex.compile(p) for p in _REGEXES[self.options.family]]

    def split(self, text: str) -> list[str]:
        if not text:
            return []
        view = text.translate(_WHITESPACE_VIEW)
        spans = [(0, len(view))]
        for pattern in self._patterns:
            spans = self._split_spans(pattern, view, spans)
        return [text[a:b] for a, b in spans]

    @staticmethod
    def _split_spans(pattern: regex.Pattern, view: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        append = out.append
        for start, end in spans:
            pos = start
            # pos/endpos keep lookarounds and \Z inside the piece, like llama.cpp's sub-range iterators
            for m in pattern.finditer(view, start, end):
                a, b = m.span()
                if a > pos:
                    append((pos, a))
                if b > a:
                    append((a, b))
                pos = b
            if pos < end:
                append((pos, end))
        return out
