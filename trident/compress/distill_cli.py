"""`trident distill --teacher T --student S --text TEXT --steps N --out DIR [--resume]`: knowledge distillation
(trident/compress/distill.py) of a student from a frozen teacher on a text, with a progress bar, checkpoints
(trident/compress/distill_state.py) and resume; OUT becomes a Hugging Face folder of the student with distill.json
(config, loss curve, held-out perplexities, wall time, tokens seen)."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from array import array
from datetime import datetime, timezone

from trident.cli_args import model_path, new_output_folder
from trident.compress.distill import CONFIG_FIELDS, DTYPES, RESUMABLE_CHANGES, DistillConfig
from trident.errors import TridentError

DISTILL_DESCRIPTION = (
    "Knowledge distillation: the student (e.g. a folder written by trident prune) learns the frozen teacher's "
    "next-token distributions on --text; loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, "
    "next tokens), logits softened by T = --temperature. Both run through Hugging Face transformers, the student "
    "with float32 master weights (bf16 autocast on CUDA), AdamW with a linear warmup and a cosine decay, random "
    "windows of --seq-len tokens drawn by a seeded generator. Checkpoints go to OUT/checkpoints/step-N (the newest "
    "--keep-checkpoints kept); --resume continues the newest exactly. OUT becomes a Hugging Face folder of the "
    "student (loadable by trident and transformers) with distill.json; compare with: trident eval ppl TEACHER "
    "STUDENT OUT --text TEXT."
)
DISTILL_JSON = "distill.json"


def add_distill_parser(sub) -> None:
    d = DistillConfig(steps=1)
    p = sub.add_parser("distill", help="train a (pruned) student on a frozen teacher's softened logits (knowledge "
                       "distillation) into a Hugging Face folder", description=DISTILL_DESCRIPTION,
                       epilog="See docs/compression.md. Example: trident distill --teacher default --student "
                       "smollm2-p20 --text shakespeare --steps 500 --out smollm2-p20-kd --device cuda")
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the model to learn from: a .gguf file, a "
                   "Hugging Face folder, or 'default' (the embedded model)")
    p.add_argument("--student", required=True, metavar="MODEL", help="the model trained (same vocabulary as the "
                   "teacher): a folder, a .gguf file or 'default'")
    p.add_argument("--text", required=True, metavar="TEXT", help="training text: shakespeare or kjv (their calib "
                   "slice unless --slice) or a UTF-8 file (whole)")
    p.add_argument("--slice", default=None, choices=["calib", "eval", "all"],
                   help="the part of a named corpus trained on (default calib, leaving eval held out)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps, one batch each")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty; with --resume, "
                   "the folder of the run to continue)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its newest checkpoint (same "
                   "teacher, student, text and training settings)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay:g})")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"softening temperature T (default {d.temperature:g})")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"weight of the KL term; 1 - alpha weighs the cross-entropy (default {d.alpha:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"gradient-norm clip, 0 for none (default {d.grad_clip:g})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"window sampling and torch seed (default {d.seed})")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help="autocast dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds of training: checkpoint, write OUT as it is (distill.json "
                   "says finished: false), and leave the rest to --resume")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints, 0 for the end only (default {d.checkpoint_every})")
    c.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    c.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"steps per point of the loss curve (default {d.log_every})")
    e = p.add_argument_group("held-out perplexity")
    e.add_argument("--eval-text", default=None, metavar="TEXT", help="measure the student's perplexity (and the "
                   "teacher's once) on this text: a named corpus's eval slice or a UTF-8 file (whole)")
    e.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="also every K steps (default: before and after training only)")
    e.add_argument("--eval-tokens", type=int, default=4096, help="first tokens of --eval-text used (default 4096)")
    e.add_argument("--eval-window", type=int, default=512, help="tokens per non-overlapping window (default 512)")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from trident.compress.distill import Distiller
    from trident.compress.distill_state import latest_checkpoint, load_checkpoint

    config = DistillConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, temperature=args.temperature, alpha=args.alpha,
        grad_clip=args.grad_clip or None, seed=args.seed, checkpoint_every=args.checkpoint_every or None,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, device=args.device, dtype=args.dtype)
    if args.eval_every is not None and args.eval_every < 1:
        raise TridentError(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.eval_every is not None and args.eval_text is None:
        raise TridentError("--eval-every needs --eval-text")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise TridentError(f"--device {config.device}, but torch sees no CUDA device here; use --device cpu")
    if args.resume:
        out = os.path.expanduser(args.out)
        resume_from = latest_checkpoint(out)
    else:
        out, resume_from = new_output_folder(args.out), None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    teacher_ckpt, student_ckpt = _load(args.teacher, "teacher"), _load(args.student, "student")
    _check_vocabularies(teacher_ckpt, student_ckpt)
    with console.status("tokenizing"):
        token_ids, text_record = _training_tokens(student_ckpt.tokenizer, args.text, args.slice)
        eval_windows, eval_record = (None, None) if args.eval_text is None else _eval_windows(
            student_ckpt.tokenizer, args.eval_text, args.eval_tokens, args.eval_window)
    sources = {"teacher": args.teacher, "student": args.student, "text": text_record}
    with console.status("building the teacher and the student (transformers)"):
        teacher = _transformers(teacher_ckpt)
        student = _transformers(student_ckpt)
        del teacher_ckpt
        masked = _masked_parameters(student_ckpt, student)
        distiller = Distiller(teacher, student, token_ids, config, masked=masked)
    if masked:
        console.print(f"the student is a masked model (trident_sparsity): the zeros of its {len(masked)} decoder "
                      "projections are kept through training")
    record = {"kind": "distill", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": config.as_dict(), "sources": sources, "eval": eval_record, "curve": [], "evals": [],
              "teacher_eval": None, "steps_done": 0, "tokens_seen": 0, "train_seconds": 0.0, "seconds": 0.0,
              "resumed_from": [], "finished": False}
    if resume_from is not None:
        previous = load_checkpoint(distiller, resume_from)
        _check_resumable(previous, config, sources, eval_record)
        record.update({k: previous[k] for k in ("curve", "evals", "teacher_eval", "steps_done", "tokens_seen",
                                                 "train_seconds", "seconds", "resumed_from", "date")})
        record["resumed_from"] = previous["resumed_from"] + [resume_from]
        console.print(f"resuming from {resume_from} (step {distiller.step_index} of {config.steps})")
    elif eval_windows is not None:
        with console.status("held-out perplexity of the teacher and the student before training"):
            record["teacher_eval"] = _evaluate(distiller, eval_windows, teacher=True)
            record["evals"].append(_evaluate(distiller, eval_windows))
        console.print(f"held-out perplexity: teacher {record['teacher_eval']['perplexity']:.3f}, student "
                      f"{record['evals'][-1]['perplexity']:.3f} (step 0)")
    stopped = _train(distiller, record, out, console, eval_windows, args.eval_every, args.time_limit)
    files = _finish(distiller, record, out, student_ckpt, eval_windows, stopped, console)
    console.print(f"student written to {out} ({', '.join(files)})")
    return 0


def _masked_parameters(checkpoint, student) -> tuple[str, ...]:
    """The student's parameters whose zeros are a mask, for a folder written by ``trident prune --structure
    unstructured|2:4`` (config.json's trident_sparsity): the decoder projections' weights; () otherwise."""
    from trident.compress.sparsity import PROJECTIONS, read_sparsity

    if read_sparsity(checkpoint.hf_config) is None:
        return ()
    suffixes = tuple(f".{module}.weight" for module in PROJECTIONS)
    return tuple(name for name, _ in student.named_parameters()
                 if name.startswith("model.layers.") and name.endswith(suffixes))


def _transformers(checkpoint):
    """The checkpoint as a transformers model. A folder written by ``trident share`` is expanded (every layer gets
    its source layer's tensors) and its shared layers tied to their sources' parameters, so that training updates
    one tensor from every layer that uses it; the student's final folder and checkpoints then hold each shared
    tensor once, under its source layer's names (named_parameters lists a tied parameter once, first where it is
    first met: the source, the lower layer), with config.json's sharing keys kept."""
    from trident.compress.hf_model import transformers_model

    sharing = checkpoint.config.shared_layers
    if sharing is None:
        return transformers_model(checkpoint.tensors, checkpoint.hf_config)
    from trident.compress.share import expand_tensors, tie_shared_layers

    model = transformers_model(expand_tensors(checkpoint.tensors, sharing, checkpoint.config.num_layers),
                               checkpoint.hf_config)
    tie_shared_layers(model, sharing)
    return model


def _load(name: str, role: str):
    from trident.loader import load_checkpoint

    checkpoint = load_checkpoint(model_path(name))
    if checkpoint.quantization is not None:
        raise TridentError(f"the {role} {name} is quantized; distillation trains float weights: pass the float "
                           "model (quantize the distilled folder afterwards)")
    return checkpoint


def _check_vocabularies(teacher, student) -> None:
    t_vocab, s_vocab = teacher.hf_config.get("vocab_size"), student.hf_config.get("vocab_size")
    if t_vocab != s_vocab:
        raise TridentError(f"the teacher has a vocabulary of {t_vocab} tokens and the student {s_vocab}: "
                           "distillation compares their logits token by token, so they must share one tokenizer")
    if student.tokenizer is None:
        raise TridentError(f"the student {student.path} has no tokenizer (tokenizer.json); distillation needs one "
                           "to tokenize --text")
    if teacher.tokenizer is not None and teacher.tokenizer.backend.get_vocab() != student.tokenizer.backend.get_vocab():
        raise TridentError("the teacher's and the student's tokenizers map tokens to different ids; distill between "
                           "models of one tokenizer (e.g. a model and its pruned folder)")


def _training_tokens(tokenizer, text: str, which: str | None):
    import torch

    from trident.compress.texts import CORPORA, encode_first, read_source, slice_text

    source = read_source(text)
    which = which or ("calib" if text in CORPORA else "all")
    ids = encode_first(tokenizer, slice_text(source.text, which))
    digest = hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).hexdigest()
    return torch.tensor(ids, dtype=torch.long), {"text": text, "description": source.description, "slice": which,
                                                 "tokens": len(ids), "fingerprint": digest}


def _eval_windows(tokenizer, text: str, max_tokens: int, window: int):
    import torch

    from trident.compress.eval import PerplexityConfig, plan_windows
    from trident.compress.texts import default_slice, encode_first, read_source, slice_text

    source = read_source(text)
    which = default_slice(text)
    ids = encode_first(tokenizer, slice_text(source.text, which), max_tokens)
    plan = plan_windows(ids, PerplexityConfig(window=window, max_tokens=max_tokens))
    windows = torch.tensor([ids[w.start: w.end] for w in plan.windows], dtype=torch.long)
    return windows, {"text": text, "description": source.description, "slice": which, "window": window,
                     "windows": len(plan.windows), "scored_tokens": plan.num_scored_tokens,
                     "fingerprint": plan.fingerprint}


def _evaluate(distiller, windows, teacher: bool = False) -> dict:
    from trident.compress.distill import mean_nll

    model = distiller.teacher if teacher else distiller.student
    nll = mean_nll(model, windows, batch_size=distiller.config.batch_size, autocast=distiller.autocast)
    return {"step": distiller.step_index, "nll": nll, "perplexity": math.exp(nll) if nll < 700 else math.inf}


def _check_resumable(previous: dict, config: DistillConfig, sources: dict, eval_record: dict | None) -> None:
    changed = [f"{k} ({previous['config'][k]!r} -> {getattr(config, k)!r})" for k in CONFIG_FIELDS
               if k not in RESUMABLE_CHANGES and previous["config"].get(k) != getattr(config, k)]
    if changed:
        raise TridentError(f"--resume continues a run with its settings, but these differ: {', '.join(changed)}; "
                           f"only {', '.join(RESUMABLE_CHANGES)} may change")
    for key in ("teacher", "student", "text"):
        if previous["sources"][key] != sources[key]:
            raise TridentError(f"--resume continues a run on the same models and text, but the {key} differs: "
                               f"{previous['sources'][key]!r} then, {sources[key]!r} now")
    if previous["eval"] != eval_record:
        raise TridentError("--resume continues a run with the same --eval-text / --eval-tokens / --eval-window; "
                           "pass those of the first run")


def _train(distiller, record: dict, out: str, console, eval_windows, eval_every: int | None,
           time_limit: float | None) -> str | None:
    """Run the remaining steps with a progress bar, logging, evaluations and checkpoints. Returns why it stopped
    early (None: all steps done)."""
    from rich import progress

    from trident.compress.distill_state import save_checkpoint

    config = distiller.config
    t_start, seconds_before = time.perf_counter(), record["seconds"]
    window: list = []
    saved_at = distiller.step_index

    def checkpoint() -> None:
        nonlocal saved_at
        record["seconds"] = seconds_before + time.perf_counter() - t_start
        save_checkpoint(distiller, out, record, config.keep_checkpoints)
        saved_at = distiller.step_index

    columns = (progress.TextColumn("distilling"), progress.BarColumn(), progress.MofNCompleteColumn(),
               progress.TextColumn("loss {task.fields[loss]} KL {task.fields[kl]} CE {task.fields[ce]} "
                                   "{task.fields[tps]} tok/s"), progress.TimeElapsedColumn(),
               progress.TimeRemainingColumn())
    with progress.Progress(*columns, console=console) as bar:
        task = bar.add_task("distill", total=config.steps, completed=distiller.step_index, loss="-", kl="-",
                            ce="-", tps="-")
        try:
            while distiller.step_index < config.steps:
                result = distiller.step()
                window.append(result)
                record["steps_done"] = distiller.step_index
                record["tokens_seen"] += result.tokens
                record["train_seconds"] += result.seconds
                bar.update(task, advance=1, loss=f"{result.loss:.3f}", kl=f"{result.kl:.3f}",
                           ce=f"{result.ce:.3f}", tps=f"{result.tokens / result.seconds:,.0f}")
                step = distiller.step_index
                if step % config.log_every == 0 or step == config.steps:
                    point = _curve_point(step, window)
                    record["curve"].append(point)
                    window = []
                    bar.console.print(f"step {step}/{config.steps}: loss {point['loss']:.4f} KL {point['kl']:.4f} "
                                      f"CE {point['ce']:.4f} lr {point['lr']:.2e} "
                                      f"{point['tokens_per_second']:,.0f} tok/s {point['seconds_per_step']:.2f} s/step")
                if eval_every is not None and step % eval_every == 0 and step < config.steps:
                    record["evals"].append(_evaluate(distiller, eval_windows))
                    bar.console.print(f"step {step}: held-out perplexity {record['evals'][-1]['perplexity']:.3f}")
                if config.checkpoint_every is not None and step % config.checkpoint_every == 0 \
                        and step < config.steps:
                    checkpoint()
                if time_limit is not None and time.perf_counter() - t_start >= time_limit \
                        and step < config.steps:
                    bar.console.print(f"--time-limit {time_limit:g} s reached at step {step}; continue with --resume")
                    return "time limit"
        except KeyboardInterrupt:
            if distiller.step_index > saved_at:
                checkpoint()
                bar.console.print(f"checkpoint saved at step {distiller.step_index}; continue with --resume")
            raise
        finally:
            record["seconds"] = seconds_before + time.perf_counter() - t_start
    return None


def _curve_point(step: int, results: list) -> dict:
    n = len(results)
    seconds = sum(r.seconds for r in results)
    return {"step": step, "loss": sum(r.loss for r in results) / n, "kl": sum(r.kl for r in results) / n,
            "ce": sum(r.ce for r in results) / n, "lr": results[-1].lr,
            "grad_norm": sum(r.grad_norm for r in results) / n,
            "tokens_per_second": sum(r.tokens for r in results) / seconds, "seconds_per_step": seconds / n}


def _finish(distiller, record: dict, out: str, student_ckpt, eval_windows, stopped: str | None, console) -> list[str]:
    import json

    from trident.compress.distill_state import save_checkpoint, write_student_folder

    if eval_windows is not None and (not record["evals"] or record["evals"][-1]["step"] != distiller.step_index):
        with console.status("held-out perplexity of the student"):
            record["evals"].append(_evaluate(distiller, eval_windows))
    record["finished"] = stopped is None
    record["stopped"] = stopped
    save_checkpoint(distiller, out, record, distiller.config.keep_checkpoints)
    files = write_student_folder(distiller.student, student_ckpt.hf_config, student_ckpt, out)
    record["files"] = files + [DISTILL_JSON]
    with open(os.path.join(out, DISTILL_JSON), "w") as f:
        json.dump(record, f, indent=2)
    if record["evals"]:
        first, last = record["evals"][0], record["evals"][-1]
        teacher = record["teacher_eval"]
        console.print(f"held-out perplexity: student {first['perplexity']:.3f} (step {first['step']}) -> "
                      f"{last['perplexity']:.3f} (step {last['step']})"
                      + (f", teacher {teacher['perplexity']:.3f}" if teacher else ""))
    per_step = record["train_seconds"] / max(1, record["steps_done"])
    console.print(f"{record['steps_done']} of {distiller.config.steps} steps, {record['tokens_seen']:,} tokens, "
                  f"{record['train_seconds']:.1f} s training ({per_step:.2f} s/step)")
    return record["files"]
