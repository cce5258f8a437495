"""Building a ``tokenizers.Tokenizer`` from the vocabulary a GGUF file stores in its metadata.

Two vocabulary kinds (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE with explicit merges; the text is split by the regex named in
  ``tokenizer.ggml.pre`` (GPT-2's, Llama 3's or Qwen2's).
- ``llama``: SentencePiece-style BPE (Llama 2, Mistral, Gemma) with byte fallback. Merges are taken
  from the file when present, otherwise rebuilt from the token scores: a pair merges with the rank of
  the score of the token it makes (Gemma: by the token's position in the vocabulary).

Tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens, so they are
matched whole in the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from trident.errors import TridentError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""llama.cpp token types (``tokenizer.ggml.token_type``)."""

_SPM_SPACE = "\u2581"

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"), LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_SPLIT),
}
"""``tokenizer.ggml.pre`` -> split regex; anything else (gpt2, smollm, default, ...) uses GPT-2's."""
_IGNORE_MERGES = frozenset(k for k, v in PRE_TOKENIZER_SPLITS.items() if v == LLAMA3_SPLIT)
"""Llama 3's tokenizer takes a whole pre-token from the vocabulary before applying merges."""

END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
)
"""Tokens that end generation when the vocabulary has them as special tokens (as llama.cpp does)."""


@dataclass(frozen=True)
class GGUFVocabulary:
    """What the Tokenizer needs besides the backend: special tokens and BOS/EOS behaviour."""

    backend: BackendTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    special_tokens: dict[str, str]
    """bos_token / eos_token / unk_token / pad_token -> text, for chat templates."""
    add_bos: bool
    add_eos: bool
    eos_token_ids: tuple[int, ...]
    chat_template: str | None


@lru_cache(maxsize=1)
def _foreign_char() -> re.Pattern[str]:
    """Matches a character outside the byte-level alphabet."""
    return re.compile("[^" + "".join(re.escape(c) for c in byte_alphabet().values()) + "]")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_gguf_vocabulary(metadata: Mapping[str, Any]) -> GGUFVocabulary:
    """The tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TridentError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise TridentError("the GGUF tokenizer is corrupt: token, type and score lists differ in length")
    arch = str(metadata.get("general.architecture", ""))
    if kind not in ("gpt2", "llama"):
        raise TridentError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
        )
    try:
        if kind == "gpt2":
            backend = _byte_level(tokens, metadata)
        else:
            backend = _sentencepiece(tokens, metadata, gemma=arch.startswith("gemma"))
    except Exception as e:  # tokenizers raises bare Exceptions for inconsistent vocabularies and merges
        raise TridentError(f"the GGUF tokenizer is corrupt ({e})") from None
    add_bos_default = kind == "llama"
    _add_special_tokens(backend, tokens, types, kind == "gpt2")

    def token_at(key: str) -> tuple[int | None, str | None]:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    bos_id, bos = token_at("bos")
    eos_id, eos = token_at("eos")
    specials = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("unknown")[1],
        "pad_token": token_at("padding")[1],
    }
    stop = [eos_id, token_at("eot")[0], token_at("eom")[0]]
    index = {t: i for i, t in enumerate(tokens)}
    stop += [index[t] for t in END_OF_TURN_TOKENS if t in index and types[index[t]] == CONTROL]
    return GGUFVocabulary(
        backend=backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        special_tokens={k: v for k, v in specials.items() if v is not None},
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        eos_token_ids=tuple(dict.fromkeys(i for i in stop if i is not None)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _byte_level(tokens: list[str], metadata: Mapping[str, Any]) -> BackendTokenizer:
    alphabet = byte_alphabet()
    foreign = _foreign_char()

    def spell(token: str) -> str:
        return "".join(alphabet[b] for b in token.encode("utf-8")) if foreign.search(token) else token

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], metadata: Mapping[str, Any], gemma: bool) -> BackendTokenizer:
    if gemma:  # Gemma stores runs of spaces as real spaces; its merges follow vocabulary order
        tokens = [_SPM_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores: Sequence[float] = [-float(i) for i in range(len(tokens))]
    else:
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    file_merges = metadata.get("tokenizer.ggml.merges")
    if file_merges:
        merges = [tuple(m.split(" ", 1)) for m in file_merges]
    else:
        merges = merges_from_scores(tokens, scores, vocab)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if gemma and unk_id is not None else None
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    else:
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPM_SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (best first; ties: longer left piece first)."""
    found: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                pairs.append((vocab[left], vocab[right], left, right))
        pairs.sort()
        found.extend((score, len(left), len(right), left, right) for _, _, left, right in pairs)
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in found]


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], types: Sequence[int], byte_level: bool) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens. In a byte-level
    vocabulary a CONTROL token outside the byte alphabet is a converter mislabel and is left alone."""
    foreign = _foreign_char() if byte_level else None
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == CONTROL and (foreign is None or not foreign.search(t))
    ]
    if control:
        backend.add_special_tokens(control)
    user_defined = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED]
    if user_defined:
        vocab = backend.get_vocab()
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined if t in vocab])
