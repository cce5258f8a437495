"""The command-line options that split a model over ranks (``--tensor-parallel N``, ``--expert-parallel``), one
definition for ``generate``, ``serve`` and ``bench``: each command says what its ranks do beyond the common part."""

from __future__ import annotations

import argparse


def add_parallel_args(parser: argparse.ArgumentParser, subject: str, detail: str, expert_detail: str) -> None:
    """``--tensor-parallel N`` (splitting ``subject``; ``detail``: what the command's ranks do and what it refuses)
    and ``--expert-parallel`` (``expert_detail``: what it adds for the command), with defaults 1 and off."""
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help=f"split {subject} over N processes of this host (with --device cuda one GPU each, over "
                        f"NCCL; on the CPU over gloo){detail} (default: 1; see docs/distributed.md)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="with --tensor-parallel N: each rank holds whole routed experts (E / N of every MoE "
                        f"layer) instead of a slice of every expert{expert_detail} (see docs/distributed.md)")
