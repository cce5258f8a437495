"""Incremental detokenization and stop strings: turn each sequence's new tokens into text to stream.

Two stages per sequence, both O(1)-ish per token:

1. **Decoding.** Only a small window of output ids is decoded each step: the tokens since the last
   point where the text decoded cleanly, plus the chunk before that point as context (tokenizers such
   as SentencePiece render a token differently at the start of a string, so the window's first chunk
   is decoded only to be subtracted). Text ending in U+FFFD (a UTF-8 character whose bytes are split
   across tokens) is held back until later tokens complete it. The concatenation of everything handed
   out equals ``tokenizer.decode(output_ids, skip_special_tokens)`` as long as the tokenizer decodes
   concatenatively at character boundaries given that one chunk of context (true of byte-level BPE and
   SentencePiece; not of decoders that rewrite across tokens, such as space clean-up before
   punctuation). The prompt's text is never part of the output.
2. **Stop strings** (``params.stop``). A match may span tokens. The text is cut right before the first
   match, and while the end of the text could be the beginning of a stop string that end is held back,
   so streamed text never contains any part of a stop string that later matches. Only matches that end
   in text produced once ``min_tokens`` outputs exist count (earlier ones are ignored for good).

Stop token ids and EOS are the scheduler's business; with ``skip_special_tokens`` their text is left
out by the tokenizer's decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from trident.engine.request import Sequence

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of a tokenizer this module needs."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class TextDelta:
    """What one :meth:`OutputProcessor.process` call adds to a sequence's text."""

    text: str
    """New text that is safe to stream now (possibly empty)."""
    stopped: bool = False
    """A stop string matched: the caller must finish the sequence with ``FinishReason.STOP``."""
    stop_string: str | None = None
    """Which stop string matched, when ``stopped``."""


@dataclass
class _SeqState:
    prefix_offset: int = 0
    """Output index where the decode window starts (a clean character boundary)."""
    read_offset: int = 0
    """Output index after which the tokens have not yet decoded cleanly."""
    window_emitted: int = 0
    """Characters of decode(window) already passed to the stop-string stage."""
    held: str = ""
    """Decoded text held back because it could be the start of a stop string."""
    parts: list[str] = field(default_factory=list)
    """Text handed out so far."""
    stop_string: str | None = None
    done: bool = False
    """Stopped by a stop string or flushed: nothing more comes out."""


class OutputProcessor:
    """Per-sequence incremental detokenizer with stop-string handling."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self._states: dict[int, _SeqState] = {}

    def process(self, seq: Sequence) -> TextDelta:
        """Account for the tokens appended to ``seq.token_ids`` since the last call."""
        state = self._states.setdefault(seq.seq_id, _SeqState())
        if state.done:
            return TextDelta("", state.stop_string is not None, state.stop_string)
        new_text = self._decode_new(seq, state)
        stops = seq.params.stop
        if not stops:
            state.parts.append(new_text)
            return TextDelta(new_text)

        text = state.held + new_text
        if seq.num_output_tokens >= seq.params.min_tokens:
            match = _first_stop(text, stops, new_from=len(state.held))
            if match is not None:
                position, stop_string = match
                state.held, state.stop_string, state.done = "", stop_string, True
                state.parts.append(text[:position])
                return TextDelta(text[:position], True, stop_string)
        keep = len(text) - _stop_prefix_len(text, stops)
        state.held = text[keep:]
        state.parts.append(text[:keep])
        return TextDelta(text[:keep])

    def flush(self, seq: Sequence) -> str:
        """Release all held-back text of a sequence that ends for another reason than a stop string.

        Incomplete characters come out as U+FFFD, as in a full decode; no stop string is looked for.
        Returns "" when a stop string already ended the sequence.
        """
        state = self._states.setdefault(seq.seq_id, _SeqState())
        if state.done:
            return ""
        window = self._window(seq, state)
        rest = state.held + self._decode(seq, window)[state.window_emitted:]
        state.held, state.done = "", True
        state.parts.append(rest)
        return rest

    def text(self, seq_id: int) -> str:
        """The text handed out so far (the final text once stopped or flushed)."""
        state = self._states.get(seq_id)
        if state is None:
            return ""
        if len(state.parts) > 1:
            state.parts = ["".join(state.parts)]
        return state.parts[0] if state.parts else ""

    def release(self, seq_id: int) -> None:
        """Forget a sequence (call when its output has been delivered)."""
        self._states.pop(seq_id, None)

    def _decode_new(self, seq: Sequence, state: _SeqState) -> str:
        """Newly decodable text; moves the window forward when the text ends cleanly."""
        window = self._window(seq, state)
        text = self._decode(seq, window)
        clean_end = len(text.rstrip(_REPLACEMENT))
        new_text = text[state.window_emitted:clean_end]
        state.window_emitted = max(state.window_emitted, clean_end)
        num_output = seq.num_output_tokens
        if clean_end == len(text) and num_output > state.read_offset:
            # Keep the chunk [read_offset, num_output) as the next window's context, unless it shows
            # no text (e.g. skipped special tokens): then the older context stays in the window.
            context_len = len(self._decode(seq, window[state.read_offset - state.prefix_offset:]))
            if context_len:
                state.prefix_offset, state.window_emitted = state.read_offset, context_len
            state.read_offset = num_output
        return new_text

    @staticmethod
    def _window(seq: Sequence, state: _SeqState) -> list[int]:
        return seq.token_ids[seq.num_prompt_tokens + state.prefix_offset:]

    def _decode(self, seq: Sequence, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)


def _first_stop(text: str, stops: tuple[str, ...], new_from: int) -> tuple[int, str] | None:
    """Earliest (position, stop string) of a match in ``text`` that ends after ``text[:new_from]``."""
    best: tuple[int, str] | None = None
    for stop in stops:
        position = text.find(stop, max(0, new_from - len(stop) + 1))
        if position >= 0 and (best is None or position < best[0]):
            best = (position, stop)
    return best


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
