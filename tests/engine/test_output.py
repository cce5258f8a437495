"""OutputProcessor against full decodes of real (tiny, trained here) tokenizers."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trident.engine.output import OutputProcessor, TextDelta
from trident.engine.request import SamplingParams, Sequence

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORPUS = [
    "héllo 世界 🙂 hello world, the quick brown fox jumps over the lazy dog.",
    "Ünïcödé ñ café 😀🎉 日本語のテキスト 한국어 Ελληνικά emoji 👩‍👩‍👧 end.",
    "stop here STOP there, ab abc abcd <tag> </tag> 1234 numbers 3.14",
] * 40
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


class Decoder:
    """The decode protocol over a `tokenizers.Tokenizer`, recording the length of each decode call."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.all_special_ids = [tokenizer.token_to_id(s) for s in SPECIALS]
        self.calls: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


@functools.cache
def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style byte-level BPE: multi-byte characters are often split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.cache
def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece style: decode drops the leading space of the first token of every call."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        show_progress=False))
    return tok


def byte_level() -> Decoder:
    return Decoder(byte_level_tokenizer())


def make_seq(params: SamplingParams, prompt=(5, 6, 7), seq_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, request_id="r", sample_index=0, prompt_token_ids=list(prompt),
                    params=params)


def stream(processor: OutputProcessor, seq: Sequence, output_ids: list[int],
           flush: bool = True) -> tuple[list[TextDelta], str]:
    """Feed tokens one at a time until a stop string matches; then flush if asked."""
    deltas = []
    for token in output_ids:
        seq.token_ids.append(token)
        deltas.append(processor.process(seq))
        if deltas[-1].stopped:
            break
    flushed = processor.flush(seq) if flush else ""
    return deltas, flushed


def joined(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


# ---------------------------------------------------------------------------------------------
# Incremental decoding


@HYPO
@given(data=st.data(), skip=st.booleans(), metaspace=st.booleans())
def test_deltas_concatenate_to_full_decode(data, skip, metaspace):
    decoder = Decoder(metaspace_tokenizer() if metaspace else byte_level_tokenizer())
    ids = st.integers(0, decoder.vocab_size - 1)
    prompt = data.draw(st.lists(ids, max_size=5))
    output = data.draw(st.lists(ids, max_size=60))
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(skip_special_tokens=skip), prompt=prompt)
    deltas, flushed = stream(processor, seq, output)
    want = decoder.decode(output, skip_special_tokens=skip)
    assert joined(deltas) + flushed == want
    assert processor.text(seq.seq_id) == want
    assert not any(d.stopped for d in deltas)


@HYPO
@given(data=st.data(), skip=st.booleans(), metaspace=st.booleans())
def test_tokens_left_unprocessed_come_out_later_in_one_piece(data, skip, metaspace):
    """Offline generation processes a sequence without stop strings only when it finishes (or at some
    steps only, when the caller mixes both kinds of step): whatever tokens were skipped, the text adds
    up to the full decode, and a sequence never processed before is decoded in one call."""
    decoder = Decoder(metaspace_tokenizer() if metaspace else byte_level_tokenizer())
    ids = st.integers(0, decoder.vocab_size - 1)
    output = data.draw(st.lists(ids, max_size=60))
    processed = data.draw(st.lists(st.booleans(), min_size=len(output), max_size=len(output)))
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(skip_special_tokens=skip), prompt=data.draw(st.lists(ids, max_size=5)))
    texts = []
    for token, process in zip(output, processed, strict=True):
        seq.token_ids.append(token)
        if process:
            texts.append(processor.process(seq).text)
    decoder.calls.clear()
    texts.append(processor.flush(seq))
    flush_calls = list(decoder.calls)
    want = decoder.decode(output, skip_special_tokens=skip)
    assert "".join(texts) == want and processor.text(seq.seq_id) == want
    if output and not any(processed):
        assert flush_calls == [len(output)]  # the whole output in one decode


@pytest.mark.parametrize("text", [
    "héllo 世界 🙂 🦀",
    "x🎉y😀 日本語のテキスト 👩‍👩‍👧 end ∑𝔘",
    "🙂🙂🙂 café ñ Ελληνικά 한국어 🚀🚀",
])
def test_split_characters_are_held_not_broken(text):
    decoder = byte_level()
    output = decoder.encode(text)
    pieces = [decoder.decode([t]) for t in output]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams())
    deltas, flushed = stream(processor, seq, output)
    assert not any("\ufffd" in d.text for d in deltas)
    assert joined(deltas) == text
    assert flushed == ""


def test_decode_window_stays_small():
    decoder = byte_level()
    text = " ".join(CORPUS[:3]) * 6
    output = decoder.encode(text)
    assert len(output) > 300
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams())
    deltas, _ = stream(processor, seq, output, flush=False)
    assert joined(deltas) == text
    assert max(decoder.calls) <= 8  # a few tokens per decode, never the whole output
    assert len(decoder.calls) <= 2 * len(output)


def test_leading_space_context_survives_skipped_special_tokens():
    """SentencePiece decode drops a leading space; a skipped special token must not hide the context."""
    decoder = Decoder(metaspace_tokenizer())
    special = decoder.tokenizer.token_to_id("<|endoftext|>")
    hello, world = decoder.encode("hello"), decoder.encode(" world")
    output = hello + [special, special] + world + [special] + hello
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams())
    deltas, flushed = stream(processor, seq, output)
    assert joined(deltas) + flushed == decoder.decode(output) == "hello world hello"


def test_prompt_text_and_special_tokens():
    decoder = byte_level()
    eos = decoder.tokenizer.token_to_id("<|endoftext|>")
    output = decoder.encode("hello world") + [eos]
    for skip, want in ((True, "hello world"), (False, "hello world<|endoftext|>")):
        processor = OutputProcessor(decoder)
        seq = make_seq(SamplingParams(skip_special_tokens=skip), prompt=decoder.encode("the prompt"))
        deltas, flushed = stream(processor, seq, output)
        assert joined(deltas) + flushed == want


def test_incomplete_character_at_the_end_is_flushed():
    decoder = byte_level()
    output = decoder.encode("ok 🦀")
    output = output[:-1]  # drop the last token, leaving the emoji's bytes incomplete
    want = decoder.decode(output)
    assert want.endswith("\ufffd")
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams())
    deltas, flushed = stream(processor, seq, output)
    assert "\ufffd" not in joined(deltas)
    assert joined(deltas) + flushed == want
    assert flushed.startswith("\ufffd") or flushed.endswith("\ufffd")


def test_release_and_independent_sequences():
    decoder = byte_level()
    processor = OutputProcessor(decoder)
    a, b = make_seq(SamplingParams(), seq_id=1), make_seq(SamplingParams(), seq_id=2)
    for token_a, token_b in zip(decoder.encode("aaa bbb"), decoder.encode("ccc ddd"), strict=False):
        a.token_ids.append(token_a)
        b.token_ids.append(token_b)
        processor.process(a)
        processor.process(b)
    assert processor.text(1) == decoder.decode(a.output_token_ids)
    assert processor.text(2) == decoder.decode(b.output_token_ids)
    processor.release(1)
    assert processor.text(1) == ""
    assert processor.text(2) != ""


# ---------------------------------------------------------------------------------------------
# Stop strings


def reference_stop(decoder: Decoder, output: list[int], stops: tuple[str, ...],
                   min_tokens: int) -> tuple[str, bool]:
    """Full decodes after every token: the first match that completes at a step >= min_tokens."""
    previous = ""
    for k in range(1, len(output) + 1):
        text = decoder.decode(output[:k]).rstrip("\ufffd")
        if k >= min_tokens:
            hits = [text.find(s, max(0, len(previous) - len(s) + 1)) for s in stops]
            hits = [h for h in hits if h >= 0]
            if hits:
                return text[:min(hits)], True
        previous = text
    return decoder.decode(output), False


STOP_ALPHABET = "ab c🙂é."


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(STOP_ALPHABET, max_size=40),
       stops=st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
       min_tokens=st.integers(0, 12), noise=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 399)),
                                                     max_size=3))
def test_stop_strings_match_reference(text, stops, min_tokens, noise):
    """Encoded text with a few arbitrary tokens (special, partial UTF-8 bytes) inserted."""
    decoder = byte_level()
    output = decoder.encode(text)
    for position, token in noise:
        output.insert(min(position, len(output)), token)
    params = SamplingParams(stop=tuple(stops), min_tokens=min_tokens, max_tokens=None)
    processor = OutputProcessor(decoder)
    seq = make_seq(params)
    deltas, flushed = stream(processor, seq, output)
    want, want_stopped = reference_stop(decoder, output, params.stop, min_tokens)
    stopped = bool(deltas) and deltas[-1].stopped
    assert stopped == want_stopped
    assert joined(deltas) + flushed == want
    assert processor.text(seq.seq_id) == want
    if stopped:
        assert flushed == ""
        assert deltas[-1].stop_string in params.stop
        # nothing streamed (text cut before the match) reaches into the matched stop string
        assert want + deltas[-1].stop_string in decoder.decode(output)


def test_stop_string_spanning_tokens():
    decoder = byte_level()
    text = "the quick brown fox jumps over the lazy dog."
    output = decoder.encode(text)
    pieces = [decoder.decode([t]) for t in output]
    stop = "own fox j"
    assert not any(stop in p for p in pieces) and len(pieces) > 4
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(stop=(stop, "zzz")))
    deltas, flushed = stream(processor, seq, output)
    assert deltas[-1].stopped and deltas[-1].stop_string == stop
    assert joined(deltas) == "the quick br" and flushed == ""
    # every streamed prefix stays before the stop string: no part of it was ever shown
    streamed = ""
    for d in deltas:
        streamed += d.text
        assert "the quick br".startswith(streamed)
    assert len(deltas) < len(output)  # generation stopped early
    again = processor.process(seq)  # further calls say stopped and add nothing
    assert again.stopped and again.text == ""


def test_held_suffix_is_streamed_once_it_cannot_match():
    decoder = byte_level()
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(stop=("lazy cat",)))
    deltas, flushed = stream(processor, seq, decoder.encode("over the lazy dog"), flush=False)
    streamed = joined(deltas)
    assert streamed == "over the lazy dog"
    assert not any(d.stopped for d in deltas)
    # while "the lazy" was the latest text it was held back
    partial = ""
    for d in deltas:
        partial += d.text
        assert not partial.endswith(("l", "la", "laz", "lazy", "lazy "))


def test_stop_string_completed_before_min_tokens_never_counts():
    """A match that ended before min_tokens is ignored for good, even while still held back."""
    decoder = byte_level()
    output = [decoder.encode(c)[0] for c in "abxb"]
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(stop=("b", "abc"), min_tokens=3, max_tokens=None))
    deltas, _ = stream(processor, seq, output)
    assert [d.text for d in deltas] == ["", "", "abx", ""]
    assert deltas[-1].stopped and deltas[-1].stop_string == "b"
    assert processor.text(seq.seq_id) == "abx"


def test_flush_returns_held_text():
    decoder = byte_level()
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(stop=("nighttime",)))
    deltas, _ = stream(processor, seq, decoder.encode("the end is nigh"), flush=False)
    assert joined(deltas) == "the end is "
    assert processor.flush(seq) == "nigh"
    assert processor.text(seq.seq_id) == "the end is nigh"
    assert processor.flush(seq) == ""


def test_min_tokens_ignores_early_stop_strings():
    decoder = byte_level()
    text = "stop here STOP there, stop here again"
    output = decoder.encode(text)
    first_done = len(decoder.encode("stop"))
    processor = OutputProcessor(decoder)
    params = SamplingParams(stop=("stop",), min_tokens=first_done + 1, max_tokens=None)
    seq = make_seq(params)
    deltas, flushed = stream(processor, seq, output)
    assert deltas[-1].stopped
    assert joined(deltas) == "stop here STOP there, "
    assert flushed == ""

    # a stop string completed exactly by the min_tokens-th token counts
    processor = OutputProcessor(decoder)
    seq = make_seq(SamplingParams(stop=("stop",), min_tokens=first_done, max_tokens=None))
    deltas, _ = stream(processor, seq, output)
    assert deltas[-1].stopped and joined(deltas) == ""
    assert len(deltas) == first_done
