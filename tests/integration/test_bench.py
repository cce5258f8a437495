"""`trident bench` runs end to end, side by side with HF transformers, and writes its JSON."""

from __future__ import annotations

import json

from trident.cli import main


def test_bench_latency_compare_hf_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "latency.json"
    assert main(["bench", "latency", "--compare", "hf", "--prompt-len", "24", "--output-len", "6", "--repeat", "2",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["kind"] == "latency" and record["workload"]["prompt_len"] == 24
    engines = [r["engine"] for r in record["results"]]
    assert engines[0].startswith("trident (") and engines[1].startswith("hf-transformers (")
    assert engines[0].split("(")[1] == engines[1].split("(")[1]  # the peer runs in trident's dtype
    for row in record["results"]:
        assert row["output_tokens"] == 6 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert "trident / peer" in capsys.readouterr().out


def test_bench_offline_writes_json(tmp_path) -> None:
    path = tmp_path / "offline.json"
    assert main(["bench", "offline", "--num-prompts", "4", "--prompt-len", "16", "--output-len", "5", "--repeat", "1",
                 "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["results"]
    assert row["requests"] == 4 and row["output_tokens"] == 20 and row["output_tok_s"] > 0
