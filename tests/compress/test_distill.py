"""Knowledge distillation (trident/compress/distill*.py, `trident distill`) on tiny random Llamas with a byte
tokenizer: the loss equals a float64 hand computation, a short run brings a noisy copy of the teacher closer to
it, an interrupted run resumed from its checkpoint ends with exactly the weights of an uninterrupted one, the
output folder gives transformers' logits in trident and its logged perplexities equal trident's `eval ppl`, and
the errors a user can cause."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from byte_tokenizer import save_with_byte_tokenizer
from engine_logits import load_engine, prefill_logits
from safetensors.torch import load_file

from trident.cli import main
from trident.compress.distill import DistillConfig, Distiller, distillation_loss, lr_factor
from trident.errors import TridentError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

TEXT = "".join(f"Verse {i}: the miller ground the corn and sang of rivers {i * 5 % 11} times before dawn.\n"
               for i in range(80))
HELD_OUT = "".join(f"Line {i}: a lantern swung above the quay while gulls argued over {i * 3 % 7} herring.\n"
                   for i in range(20))
RUN = ("--steps", "6", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "1", "--log-every", "1",
       "--checkpoint-every", "3", "--seed", "4")


def _config(**kw) -> transformers.LlamaConfig:
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaConfig(**{**sizes, **kw})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """teacher; student (the teacher with noise added to every weight); wide (a vocabulary of 264 tokens)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = save_with_byte_tokenizer(_config(), root / "teacher", seed=11)
    student = root / "student"
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    torch.manual_seed(12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(student)
    shutil.copyfile(teacher / "tokenizer.json", student / "tokenizer.json")
    wide = save_with_byte_tokenizer(_config(vocab_size=264), root / "wide", seed=13)
    (root / "train.txt").write_text(TEXT, encoding="utf-8")
    (root / "held.txt").write_text(HELD_OUT, encoding="utf-8")
    return {"teacher": teacher, "student": student, "wide": wide, "text": root / "train.txt",
            "held": root / "held.txt"}


def _distill(dirs, out: Path, *extra: str) -> int:
    return main(["distill", "--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--text",
                 str(dirs["text"]), "--out", str(out), *RUN, *extra])


# ----- the loss -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.5), (1.0, 1.0), (4.0, 0.1), (0.7, 0.0)])
def test_loss_equals_a_float64_hand_computation(temperature: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 11, (2, 5), generator=g)

    def softmax(z):
        e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    p_t, p_s = softmax(teacher / temperature), softmax(student / temperature)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1).mean()
    ce = -torch.log(softmax(student).gather(-1, targets[..., None])).mean()
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce

    got = distillation_loss(student.float(), teacher.float(), targets, temperature=temperature, alpha=alpha)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kl.double(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce.double(), ce, rtol=1e-5, atol=1e-6)
    exact = distillation_loss(student, teacher, targets, temperature=temperature, alpha=alpha)
    torch.testing.assert_close(exact.loss, expected, rtol=1e-12, atol=1e-12)


def test_learning_rate_schedule_known_values() -> None:
    # 2 warmup steps: 1/3, 2/3 of the peak; then cosine over the remaining 8 steps: 1 at step 2, 1/2 at step 6
    factors = [lr_factor(s, 2, 10) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[6] == pytest.approx(0.5)
    assert factors[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


# ----- training brings the student closer to the teacher ---------------------------------------------------------

def _kl64(teacher, student, windows: torch.Tensor) -> float:
    """KL(teacher || student) per predicted token at T = 1, float64, from the models' logits."""
    with torch.no_grad():
        t = torch.log_softmax(teacher(windows).logits[:, :-1].double(), -1)
        s = torch.log_softmax(student(windows).logits[:, :-1].double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_a_short_run_brings_a_noisy_student_closer_to_the_teacher(dirs) -> None:
    teacher = transformers.AutoModelForCausalLM.from_pretrained(dirs["teacher"], dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(dirs["student"], dtype=torch.float32)
    tokens = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    held = torch.tensor(list(HELD_OUT.encode()), dtype=torch.long)[: 4 * 48].view(4, 48)
    before = _kl64(teacher, student.eval(), held)
    distiller = Distiller(teacher, student, tokens, DistillConfig(steps=20, batch_size=4, seq_len=48, lr=3e-3,
                                                                  alpha=0.9, seed=2))
    losses = [distiller.step().kl for _ in range(20)]
    after = _kl64(teacher, student.eval(), held)
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-3:]) < sum(losses[:3])


# ----- checkpoints, resume, the output folder ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(dirs, tmp_path_factory) -> Path:
    """6 steps in one run, with held-out perplexities every 3 steps."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert _distill(dirs, out, "--eval-text", str(dirs["held"]), "--eval-every", "3", "--eval-tokens", "128",
                    "--eval-window", "32") == 0
    return out


def test_resume_after_an_interruption_ends_with_the_weights_of_an_uninterrupted_run(dirs, straight, tmp_path,
                                                                                     monkeypatch) -> None:
    calls = []
    real_step = Distiller.step

    def step(self):
        calls.append(self.step_index)
        if len(calls) == 5 and not resumed:
            raise KeyboardInterrupt  # during step 5: the handler checkpoints the 4 steps done
        return real_step(self)

    resumed = False
    monkeypatch.setattr(Distiller, "step", step)
    out = tmp_path / "out"
    eval_args = ("--eval-text", str(dirs["held"]), "--eval-every", "3", "--eval-tokens", "128", "--eval-window", "32")
    assert _distill(dirs, out, *eval_args) == 130
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert not (out / "model.safetensors").exists()
    resumed, calls[:] = True, []
    assert _distill(dirs, out, "--resume", *eval_args) == 0
    assert calls == [4, 5]  # two steps run, from the checkpoint of step 4

    expected, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    at_4 = load_file(out / "checkpoints" / "step-4" / "model.safetensors")
    assert not torch.equal(at_4["model.norm.weight"], expected["model.norm.weight"])
    record, reference = (json.loads((d / "distill.json").read_text()) for d in (out, straight))
    def losses(r):
        return [{k: p[k] for k in ("step", "loss", "kl", "ce", "lr", "grad_norm")} for p in r["curve"]]

    assert losses(record) == losses(reference) and record["evals"] == reference["evals"]
    assert record["resumed_from"] == [str(out / "checkpoints" / "step-4")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_the_output_folder_gives_transformers_logits_in_trident(straight) -> None:
    from trident import LLM
    from trident.compress.eval import PerplexityConfig, perplexity

    record = json.loads((straight / "distill.json").read_text())
    assert (record["steps_done"], record["finished"], record["tokens_seen"]) == (6, True, 6 * 2 * 32)
    assert [p["step"] for p in record["curve"]] == [1, 2, 3, 4, 5, 6]
    assert {"config.json", "model.safetensors", "tokenizer.json", "distill.json"} <= {p.name for p in
                                                                                     straight.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(straight, dtype=torch.float32).eval()
    llm = LLM(str(straight), dtype="float32", num_blocks=32, enable_prefix_caching=False)
    tokens = llm.tokenizer.encode(HELD_OUT)[:40]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(load_engine(straight), tokens), expected, atol=1e-4, rtol=1e-4)

    # the logged held-out perplexity after training is trident's `eval ppl` of the folder on the same windows
    result = perplexity(llm, llm.tokenizer.encode(HELD_OUT), PerplexityConfig(window=32, max_tokens=128))
    assert result.fingerprint == record["eval"]["fingerprint"]
    assert [e["step"] for e in record["evals"]] == [0, 3, 6]
    assert record["evals"][-1]["nll"] == pytest.approx(result.nll, rel=1e-5)


def test_logged_perplexities_before_training_are_tridents(dirs, straight) -> None:
    from trident import LLM
    from trident.compress.eval import PerplexityConfig, perplexity

    record = json.loads((straight / "distill.json").read_text())
    for logged, model in ((record["teacher_eval"], dirs["teacher"]), (record["evals"][0], dirs["student"])):
        llm = LLM(str(model), dtype="float32", num_blocks=32, enable_prefix_caching=False)
        result = perplexity(llm, llm.tokenizer.encode(HELD_OUT), PerplexityConfig(window=32, max_tokens=128))
        assert logged["nll"] == pytest.approx(result.nll, rel=1e-5)
    assert record["evals"][-1]["nll"] < record["evals"][0]["nll"]


# ----- errors a user can cause ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -3), ("batch_size", 0), ("seq_len", 1),
                                          ("lr", 0.0), ("lr", float("nan")), ("warmup", 5), ("temperature", 0.0),
                                          ("alpha", 1.5), ("grad_clip", -1.0), ("device", "tpu"),
                                          ("dtype", "float16"), ("keep_checkpoints", 0)])
def test_invalid_settings_are_refused(field: str, value) -> None:
    with pytest.raises(TridentError, match=field):
        DistillConfig(**{"steps": 5, field: value})


def test_cli_user_errors(dirs, tmp_path, capsys) -> None:
    def error(*args: str) -> str:
        capsys.readouterr()
        assert main(["distill", *args]) == 2
        return capsys.readouterr().err

    common = ("--text", str(dirs["text"]), "--steps", "2", "--seq-len", "16", "--batch-size", "1")
    assert "vocabulary" in error("--teacher", str(dirs["teacher"]), "--student", str(dirs["wide"]), *common,
                                 "--out", str(tmp_path / "a"))
    assert "does not exist" in error("--teacher", str(tmp_path / "nowhere"), "--student", str(dirs["student"]),
                                     *common, "--out", str(tmp_path / "b"))
    assert "steps must be" in error("--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
                                    "--text", str(dirs["text"]), "--steps", "0", "--out", str(tmp_path / "c"))
    assert "holds no checkpoint" in error("--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
                                          *common, "--out", str(tmp_path), "--resume")
    assert "not an empty folder" in error("--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
                                          *common, "--out", str(dirs["teacher"]))
    assert "fewer than one window" in error("--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
                                            "--text", str(dirs["text"]), "--steps", "2", "--seq-len", "100000",
                                            "--out", str(tmp_path / "d"))
    out = tmp_path / "e"
    assert main(["distill", "--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), *common,
                 "--out", str(out)]) == 0
    changed = error("--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), *common, "--lr", "0.01",
                    "--out", str(out), "--resume")
    assert "lr (0.0001 -> 0.01)" in changed


def test_a_shared_student_trains_shared_and_stays_shared(dirs, tmp_path) -> None:
    """`trident share` then `trident distill`: the student's shared layers train one tensor (the gradients of both
    layers), and the distilled folder holds it once, still declared shared, and loads shared in trident."""
    from trident import LLM

    shared = tmp_path / "shared"
    assert main(["share", str(dirs["student"]), "--groups", "0-1", "--out", str(shared)]) == 0
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(dirs["teacher"]), "--student", str(shared), "--text", str(dirs["text"]),
                 "--out", str(out), *RUN]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["trident_shared_layers"] == json.loads((shared / "config.json").read_text())[
        "trident_shared_layers"] == {"1": 0}
    before, after = load_file(shared / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)  # the shared layer's projections are absent, its norms present
    assert "model.layers.1.self_attn.q_proj.weight" not in after and "model.layers.1.input_layernorm.weight" in after
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    layers = LLM(str(out), dtype="float32", num_blocks=8).engine.model.model.layers
    assert layers[1].mlp.down_proj.weight.data_ptr() == layers[0].mlp.down_proj.weight.data_ptr()


def test_a_masked_student_keeps_its_2_4_pattern(dirs, tmp_path) -> None:
    """`trident prune --structure 2:4` then `trident distill`: the projections train, and every zero of the mask
    is still zero afterwards (each group of four inputs keeps at most two nonzeros)."""
    masked = tmp_path / "s24"
    assert main(["prune", str(dirs["student"]), "--structure", "2:4", "--method", "l1", "--out", str(masked)]) == 0
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(dirs["teacher"]), "--student", str(masked), "--text", str(dirs["text"]),
                 "--out", str(out), *RUN]) == 0
    before, after = load_file(masked / "model.safetensors"), load_file(out / "model.safetensors")
    projections = [n for n in before if n.endswith(("q_proj.weight", "o_proj.weight", "up_proj.weight",
                                                    "down_proj.weight"))]
    assert len(projections) == 8
    for name in projections:
        zeros = before[name] == 0
        assert zeros.view(zeros.shape[0], -1, 4).sum(-1).ge(2).all()  # the 2:4 mask going in
        assert (after[name][zeros] == 0).all(), name  # kept
        assert not torch.equal(after[name], before[name]), name  # and the rest trained
    assert json.loads((out / "config.json").read_text())["trident_sparsity"]["pattern"] == "2:4"
    # the norms are not masked: they train as usual
    norms = [n for n in before if n.endswith("input_layernorm.weight")]
    assert not torch.equal(after[norms[0]], before[norms[0]])
