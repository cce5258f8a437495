"""Tokenizer: our encode/decode/encode_chat equal transformers' tokenizer for the same files — the real
SmolLM2 GGUF (byte-level BPE), a SentencePiece-style GGUF built here, and a Hugging Face folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

from trident.errors import TridentError
from trident.loader.gguf_reader import read_gguf
from trident.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "loader"))
from tiny_gguf import tiny_config, tiny_model, write_gguf  # noqa: E402

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "  leading spaces,\ttabs\n\nand   runs of    spaces   ",
    "Ünïcödé — 日本語のテキスト, Ελληνικά, русский 😀🚀",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n",
    "1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token<|endoftext|>",
    "",
    " ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "I'm sure they'll say it's fine, isn't it? \"Quoted\" {json: [1, 2]}",
    "\u00a0non-breaking\u200bzero-width\r\nwindows line",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2? Ünïcödé 😀"},
    ],
    [{"role": "user", "content": "line one\nline two\n\n  indented"}],
]


def _hf_chat_ids(hf, chat, add_generation_prompt=True) -> list[int]:
    out = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _assert_same(ours: Tokenizer, hf, texts=TEXTS, chats=CHATS):
    for text in texts:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    for chat in chats:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen
            )
            assert ours.encode_chat(chat, add_generation_prompt=gen) == _hf_chat_ids(hf, chat, gen)


# ----- the real default model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf(default_gguf_path).metadata)


@pytest.fixture(scope="module")
def smol_hf(default_gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path)
    )


@pytest.mark.slow
def test_default_model_matches_transformers(smol, smol_hf):
    _assert_same(smol, smol_hf)
    assert type(smol_hf) is transformers.TokenizersBackend
    assert smol.vocab_size == len(smol_hf) == 49152
    assert smol.bos_token_id == smol_hf.bos_token_id == 1
    assert smol.eos_token_ids[0] == smol_hf.eos_token_id == 2
    assert smol.add_bos is False


def test_default_model_tokens(smol):
    assert smol.eos_token_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert smol.id_to_token(2) == "<|im_end|>" and smol.token_to_id("<|im_end|>") == 2
    assert {0, 1, 2} <= set(smol.all_special_ids)
    hello = smol.encode(" world", add_special_tokens=False)
    assert smol.id_to_token(hello[0]) == "Ġworld" and smol.token_to_str(hello[0]) == " world"
    assert smol.decode(smol.encode("<|im_end|>x"), skip_special_tokens=True) == "x"
    ids = smol.encode_chat(CHATS[0])
    assert smol.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(pre, default_gguf_path, tmp_path):
    """SmolLM2's vocabulary re-labelled with Qwen2's and Llama 3's pre-tokenizer names."""
    meta = read_gguf(default_gguf_path).metadata
    vocab = dict(
        model="gpt2",
        tokens=meta["tokenizer.ggml.tokens"],
        types=meta["tokenizer.ggml.token_type"],
        merges=meta["tokenizer.ggml.merges"],
        pre=pre,
        bos=1,
        eos=2,
        add_bos=False,
        chat_template=meta["tokenizer.chat_template"],
    )
    config = tiny_config("llama", vocab_size=49152, hidden_size=32, intermediate_size=32, num_hidden_layers=1)
    path = write_gguf(str(tmp_path / "pre.gguf"), tiny_model(config), "Q8_0", tokenizer=vocab)
    ours = Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
    # the class AutoTokenizer picks for llama GGUFs (asserted in the default-model test), minus its
    # seconds-long config read
    hf = transformers.TokenizersBackend.from_pretrained(str(tmp_path), gguf_file="pre.gguf")
    _assert_same(ours, hf)


# ----- a SentencePiece-style ("llama") GGUF vocabulary --------------------------------------------
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small corpus for a tiny sentencepiece-like vocabulary",
    "transformers and tokenizers turn text into token ids and back again",
    "numbers like 123 and 4567 appear here too, as do tabs\tand newlines\n",
    "she sells sea shells by the sea shore; the shells she sells are surely sea shells",
] * 3
SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def spm_vocabulary() -> dict:
    """A SentencePiece-like vocabulary (<unk>, <s>, </s>, 256 byte tokens, pieces with scores) derived
    from a small BPE trained here: a piece's score is minus its merge rank."""
    bpe = BackendTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merged = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    alphabet = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if len(t) == 1]
    pieces = alphabet + [m for m in dict.fromkeys(merged) if m not in alphabet]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = (
        [0.0] * 259
        + [-1000.0 - i for i in range(len(alphabet))]
        + [-float(i) for i in range(len(pieces) - len(alphabet))]
    )
    return dict(
        model="llama",
        tokens=tokens,
        types=types,
        scores=scores,
        bos=1,
        eos=2,
        unk=0,
        chat_template=SPM_TEMPLATE,
    )


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def spm_gguf(request, tmp_path_factory) -> str:
    """Llama 2 / Mistral style (Metaspace prefix, merges by score) and Gemma style (no prefix, merges by
    vocabulary order) files over the same vocabulary."""
    vocab = spm_vocabulary()
    model = tiny_model(tiny_config(request.param, vocab_size=len(vocab["tokens"]), num_hidden_layers=1))
    path = tmp_path_factory.mktemp("spm") / f"{request.param}.gguf"
    return write_gguf(str(path), model, tokenizer=vocab)


SPM_TEXTS = [
    "the quick brown fox",
    "hello world",
    "  two leading spaces",
    "tabs\tand\nnewlines\n",
    "unseen words: zyxwv, qqq",
    "bytes: héllo 日本 😀",
    "<s> literal specials </s>",
    "",
    " ",
    "numbers 1234567",
    "trailing space ",
    "she sells sea shells",
]
SPM_CHATS = [
    [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the sea"},
        {"role": "user", "content": "she sells"},
    ]
]


def test_sentencepiece_gguf_matches_transformers(spm_gguf):
    ours = Tokenizer.from_gguf_metadata(read_gguf(spm_gguf).metadata)
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    _assert_same(ours, hf, SPM_TEXTS, SPM_CHATS)
    assert ours.add_bos and ours.encode("hello")[0] == 1 == ours.bos_token_id
    assert ours.encode_chat(SPM_CHATS[0]).count(1) == 1  # the template's BOS only
    assert ours.eos_token_ids == (2,)
    unseen = [ours.id_to_token(i) for i in ours.encode("日", add_special_tokens=False)]
    assert unseen[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]  # byte fallback


# ----- a Hugging Face folder ------------------------------------------------------------------------
def test_hf_folder_matches_transformers(smol_hf, tmp_path):
    smol_hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_folder(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    _assert_same(ours, hf)
    assert 2 in ours.eos_token_ids


def test_hf_folder_bos_from_post_processor_and_template_file(smol, tmp_path):
    """Without add_bos_token in tokenizer_config.json, tokenizer.json's post-processor decides."""
    from tokenizers import processors

    backend = BackendTokenizer.from_str(smol.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    ours = Tokenizer.from_hf_folder(str(tmp_path))
    assert ours.add_bos is None and ours.bos_token_id == 1
    assert ours.encode("hi")[0] == 1 and ours.encode("hi", add_special_tokens=False)[0] != 1
    assert ours.apply_chat_template([{"role": "user", "content": "yo"}]) == "<|im_start|>yo"
    assert ours.encode_chat([{"role": "user", "content": "yo"}]).count(1) == 1


# ----- chat template rendering ----------------------------------------------------------------------
def _with_template(smol: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        smol.backend,
        bos_token_id=1,
        eos_token_ids=(2,),
        special_tokens=smol.special_tokens,
        add_bos=False,
        chat_template=template,
    )


def test_template_features(smol):
    t = _with_template(
        smol,
        (
            "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m['content'] | tojson }}"
            "{% if m.get('name') is none %}-{% endif %}{% endfor %}{{ eos_token }}"
            "{{ strftime_now('%Y') | length }}{% if tools %}{{ tools | length }}{% endif %}"
        ),
    )
    messages = [
        {"role": "user", "content": "é", "name": None},
        {"role": "user", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert t.apply_chat_template(messages, tools=[{"type": "function"}]) == '"é"-"b"-<|im_end|>41'


def test_template_errors_are_trident_errors(smol):
    with pytest.raises(TridentError, match="no chat template"):
        _with_template(smol, None).apply_chat_template([{"role": "user", "content": "hi"}])
    strict = _with_template(
        smol, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(TridentError, match="rejected this conversation: system first"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TridentError, match="not valid Jinja"):
        _with_template(smol, "{% for %}").apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TridentError, match="list of messages"):
        smol.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(TridentError, match="must be a dict with a 'role'"):
        smol.apply_chat_template([{"content": "no role"}])
    sandboxed = _with_template(smol, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(TridentError):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])
