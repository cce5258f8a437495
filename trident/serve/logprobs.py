"""Engine logprobs (SampledToken) in the two OpenAI shapes: completions' and chat's."""

from __future__ import annotations

from collections.abc import Sequence

from trident.engine.request import SampledToken
from trident.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from trident.tokenizer import Tokenizer


def completion_logprobs(tokenizer: Tokenizer, tokens: Sequence[SampledToken], num_top: int,
                        text_offset: int = 0) -> CompletionLogprobs:
    """The /v1/completions shape; ``text_offset`` counts characters of the completion, from ``text_offset``."""
    strings, offsets = [], []
    offset = text_offset
    for t in tokens:
        s = tokenizer.token_to_str(t.token_id)
        strings.append(s)
        offsets.append(offset)
        offset += len(s)
    top = None
    if num_top > 0:
        top = [{tokenizer.token_to_str(i): lp for i, lp in t.top_logprobs[:num_top]} for t in tokens]
    return CompletionLogprobs(tokens=strings, token_logprobs=[t.logprob for t in tokens], top_logprobs=top,
                              text_offset=offsets)


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    s = tokenizer.token_to_str(token_id)
    return TopLogprob(token=s, logprob=logprob, bytes=list(s.encode("utf-8")))


def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[SampledToken], num_top: int) -> ChatLogprobs:
    """The /v1/chat/completions shape: one entry per generated token with its ``num_top`` alternatives."""
    content = []
    for t in tokens:
        head = _top(tokenizer, t.token_id, t.logprob if t.logprob is not None else float("nan"))
        alternatives = [_top(tokenizer, i, lp) for i, lp in t.top_logprobs[:num_top]]
        content.append(TokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes,
                                    top_logprobs=alternatives))
    return ChatLogprobs(content=content)
