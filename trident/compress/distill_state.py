"""Checkpoints of a distillation run and its final folder (``trident distill``, :mod:`trident.compress.distill`).

A checkpoint is ``OUT/checkpoints/step-N/`` holding

- ``model.safetensors``: the student's parameters, float32, by Hugging Face name (a tied LM head once);
- ``state.pt``: the :class:`~trident.compress.distill.Distiller` state: step, AdamW's moments, the schedule, the
  window sampler's generator and torch's RNG states (``torch.load(weights_only=True)`` reads it);
- ``run.json``: the run record so far (config, sources, loss curve, evaluations, tokens seen, seconds).

It is written under ``step-N.tmp`` and renamed, so a run killed while saving leaves the previous checkpoints
whole; only the newest ``keep_checkpoints`` are kept. The final folder is OUT itself: ``config.json`` (the
student's config), ``model.safetensors`` (float32), the student's tokenizer files and ``distill.json``; trident and
transformers load it as any Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import torch
from torch import nn

from trident.errors import TridentError

CHECKPOINTS = "checkpoints"
"""The folder of OUT that holds the checkpoints."""
_STEP = re.compile(r"^step-(\d+)$")


def student_tensors(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's parameters by name, on the CPU, float32, each storage once (a tied LM head is left out)."""
    return {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in student.named_parameters()}


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """The whole checkpoints of ``out_dir`` as (step, path), oldest first."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _STEP.match(name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str:
    """The newest checkpoint's folder; a TridentError when there is none."""
    found = checkpoints(out_dir)
    if not found:
        raise TridentError(f"--resume: {out_dir} holds no checkpoint ({CHECKPOINTS}/step-N); start the run "
                           "without --resume into a new folder")
    return found[-1][1]


def save_checkpoint(distiller, out_dir: str, record: Mapping, keep: int) -> str:
    """Write the checkpoint of ``distiller`` at its current step with the run ``record``; keep the newest
    ``keep``. Returns its folder."""
    from safetensors.torch import save_file

    root = os.path.join(out_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{distiller.step_index}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(student_tensors(distiller.student), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    torch.save(distiller.state_dict(), os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "run.json"), "w") as f:
        json.dump(record, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(distiller, path: str) -> dict:
    """Restore ``distiller`` (student weights and training state) from the checkpoint folder ``path``; returns its
    run record."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(path, "run.json")) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise TridentError(f"cannot read the checkpoint {path}: {e}; delete it to resume from an older one") from None
    params = dict(distiller.student.named_parameters())
    if set(tensors) != set(params):
        raise TridentError(f"the checkpoint {path} holds other weights than this student (e.g. "
                           f"{sorted(set(tensors) ^ set(params))[:2]}): resume with the same --student")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise TridentError(f"the checkpoint {path} has {name} of shape {tuple(tensors[name].shape)}, the "
                                   f"student {tuple(p.shape)}: resume with the same --student")
            p.copy_(tensors[name])
    distiller.load_state_dict(state)
    return record


def write_student_folder(student: nn.Module, hf_config: Mapping, tokenizer_source, out_dir: str) -> list[str]:
    """Write the student as a Hugging Face folder in ``out_dir``: config.json (``hf_config`` with the
    transformers class as ``architectures`` and float32 as its dtype), model.safetensors (float32) and the
    tokenizer of the checkpoint ``tokenizer_source`` (:func:`trident.quant.format.write_tokenizer`). Returns the
    files written."""
    from trident.quant.format import write_hf_folder

    config = dict(hf_config)
    config["architectures"] = [type(student).__name__]
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    return write_hf_folder(out_dir, student_tensors(student), config, tokenizer_source)
