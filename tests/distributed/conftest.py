"""Shared by the tests of this folder for the session: the one spawn of two gloo ranks that test_tensor_parallel.py
and test_expert_parallel.py read (tp_ranks.run_rank runs every split they check), and the tiny Llama folder the
command-line tests run (`generate`, `serve`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_folders import llama_folder
from tp_ranks import SIZE, run_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saw (tp_ranks.run_rank)."""
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(run_rank, args=(SIZE, f"tcp://127.0.0.1:{_free_port()}", str(out)), nprocs=SIZE)
    return [torch.load(out / f"rank{r}.pt") for r in range(SIZE)]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """tiny_folders.llama_folder."""
    return llama_folder(tmp_path_factory.mktemp("tp-llama"))
