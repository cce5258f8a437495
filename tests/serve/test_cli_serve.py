"""`trident serve` argument parsing (the server itself is exercised by the other tests in this folder)."""

from __future__ import annotations

from trident.cli import build_parser
from trident.serve.server import default_model_name


def test_serve_arguments():
    args = build_parser().parse_args(["serve", "model.gguf", "--port", "9000", "--served-model-name", "tiny",
                                      "--dtype", "float32", "--max-num-seqs", "8"])
    assert (args.models, args.host, args.port, args.served_model_name) == (["model.gguf"], "127.0.0.1", 9000, "tiny")
    assert args.dtype == "float32" and args.max_num_seqs == 8 and args.func.__name__ == "cmd_serve"


def test_default_served_model_name():
    assert default_model_name(None) == "SmolLM2-135M-Instruct"
    assert default_model_name("/models/qwen2-0.5b-q8_0.gguf") == "qwen2-0.5b-q8_0"
    assert default_model_name("/models/Llama-3.2-1B/") == "Llama-3.2-1B"
