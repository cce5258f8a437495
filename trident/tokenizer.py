"""The model's tokenizer: text <-> token ids, special tokens, and the chat template.

A thin layer over a ``tokenizers.Tokenizer`` (the Rust "fast" tokenizer) that adds what a model file
says around it: whether to add BOS, which tokens end a turn, and the Jinja chat template. Built from
a GGUF file's metadata (:meth:`Tokenizer.from_gguf_metadata`) or a Hugging Face folder
(:meth:`Tokenizer.from_hf_folder`); either way ``encode``/``decode``/``encode_chat`` match what
transformers' tokenizer gives for the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from trident.errors import TridentError
from trident.loader.chat_template import compile_chat_template, render_chat_template
from trident.loader.jsonfile import read_json

_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class Tokenizer:
    """A model's tokenizer: encode/decode text, its special tokens, and chat-template rendering."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        special_tokens: Mapping[str, str] | None = None,
        add_bos: bool | None = None,
        add_eos: bool = False,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        """``add_bos=None`` leaves adding special tokens to the backend's own post-processor
        (tokenizer.json); True/False overrides it, as an explicit add_bos_token does in transformers."""
        self.backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        """bos_token / eos_token / unk_token / pad_token -> text; chat templates see these names."""
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._compiled_template: Any = None
        self._special_ids = sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer in a GGUF file's metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``)."""
        from trident.loader.gguf_tokenizer import build_gguf_vocabulary

        v = build_gguf_vocabulary(metadata)
        return cls(
            v.backend,
            bos_token_id=v.bos_token_id,
            eos_token_ids=v.eos_token_ids,
            special_tokens=v.special_tokens,
            add_bos=v.add_bos,
            add_eos=v.add_eos,
            chat_template=v.chat_template,
        )

    @classmethod
    def from_hf_folder(cls, path: str, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder (tokenizer.json + tokenizer_config.json, and a
        chat_template.jinja / chat_template.json when present). ``extra_eos_token_ids``: ids that also
        end generation (from config.json / generation_config.json)."""
        from trident.loader.gguf_tokenizer import END_OF_TURN_TOKENS

        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise TridentError(f"{path} has no tokenizer.json; trident needs the fast-tokenizer file")
        try:
            backend = BackendTokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise TridentError(f"{tokenizer_file} could not be read ({e}); the file is corrupt") from None
        config = read_json(os.path.join(path, "tokenizer_config.json"), missing_ok=True)
        special_map = read_json(os.path.join(path, "special_tokens_map.json"), missing_ok=True)
        special: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(name, special_map.get(name)))
            if text is not None:
                special[name] = text
        bos_id = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        eos_ids = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
        eos_ids += list(extra_eos_token_ids)
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        eos_ids += [backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in specials]
        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[i for i in eos_ids if i is not None],
            special_tokens=special,
            add_bos=None if add_bos is None and add_eos is None else bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=_folder_chat_template(path, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ----- ids and tokens -----------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends generation: EOS plus end-of-turn tokens (<|im_end|>, <|eot_id|>, ...)."""
        return self._eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special (control) tokens, sorted."""
        return list(self._special_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id, as stored (e.g. "Ġworld", "▁world", "<|im_end|>")."""
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_to_str(self, token_id: int) -> str:
        """The text one token stands for, for display (" world"; special tokens as written)."""
        return self.backend.decode([int(token_id)], skip_special_tokens=False)

    # ----- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds the BOS (and EOS) the model expects."""
        if not isinstance(text, str):
            raise TridentError(f"a prompt must be a string, got {type(text).__name__}")
        if self.add_bos is None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self._bos_token_id is not None:
                ids.insert(0, self._bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (special tokens left out unless ``skip_special_tokens=False``)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    # ----- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The conversation rendered to prompt text with the model's chat template.

        ``kwargs`` become template variables (e.g. ``tools=[...]``, ``enable_thinking=False``)."""
        if not self.chat_template:
            raise TridentError(
                "this model has no chat template (it is probably a base model); use plain text prompts "
                "(generate) instead of chat"
            )
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        return render_chat_template(
            self._compiled_template, messages, add_generation_prompt, self.special_tokens, **kwargs
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered conversation. The template writes any BOS itself, so none is added
        (as transformers' ``apply_chat_template(tokenize=True)``)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos_token_id}, eos={self._eos_token_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _folder_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if template is None:
        template = read_json(os.path.join(path, "chat_template.json"), missing_ok=True).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
