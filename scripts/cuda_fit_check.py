"""`trident advise --fit` against the GPU memory an engine really takes (the CUDA counterpart of
tests/advise/measure_memory.py). Each case runs in a fresh process: a named shape with random weights (quantized as
`trident bench --weights` does), an engine whose KV cache holds exactly CONCURRENCY sequences of CONTEXT tokens, and
CONCURRENCY prompts of CONTEXT - 4 tokens generating 4 tokens each (every KV block written). Printed per case: the
estimate's parts (weights, KV, activation reserve) and what the device lost to the engine, measured by
torch.cuda.mem_get_info from before the weights were made (CUDA context already up) to the engine built ("loaded")
and to the end of the run, with the float weights a quantized shape starts from freed first; and torch's peak
allocated and reserved memory over the run.

    python scripts/cuda_fit_check.py                       # the default cases
    python scripts/cuda_fit_check.py SHAPE:WEIGHTS:KV:CONTEXT:CONCURRENCY ...
"""
import gc
import json
import subprocess
import sys

CASES = ("qwen3-0.6b:float:auto:4096:16", "qwen3-0.6b:int8:int8:2048:64", "llama3-8b:int4:auto:8192:8",
         "qwen3-30b-a3b:int8:fp8:4096:4")
OUTPUT_TOKENS = 4


def measure(case: str) -> dict:
    import torch

    from trident.advise.fit_cli import fit_subject
    from trident.advise.memory import estimate_fit
    from trident.bench.quantized_weights import bench_quant_config, quant_method_of, quantize_checkpoint
    from trident.bench.random_weights import random_checkpoint
    from trident.bench.shapes import resolve_shape
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.engine.request import SamplingParams

    shape_name, weights, kv, context, concurrency = case.split(":")
    context, concurrency = int(context), int(concurrency)
    device = torch.device("cuda", 0)
    torch.zeros(1, device=device)  # the CUDA context, outside what is measured
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    options = dict(device="cuda", max_model_len=context, max_num_seqs=concurrency, kv_cache_dtype=kv)
    config = engine_config(shape_name, **options)
    subject = fit_subject(None, shape_name, None if weights == "float" else weights, None, config)
    estimate = estimate_fit(subject.config, config, subject.quantization)
    shape = resolve_shape(shape_name)
    checkpoint = random_checkpoint(shape, device=device, dtype=torch.bfloat16)
    if weights != "float":
        checkpoint = quantize_checkpoint(checkpoint, bench_quant_config(weights, None), quant_method_of(weights))
    gc.collect()
    torch.cuda.empty_cache()
    engine = LLMEngine(engine_config(None, memory_budget_bytes=estimate.kv_bytes, **options), checkpoint)
    del checkpoint  # the random tensors the engine copied (unfused projections) are the bench's, not the engine's
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    loaded_free, _ = torch.cuda.mem_get_info(device)
    loaded_reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0)
    for i in range(concurrency):
        engine.add_request([(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(context - OUTPUT_TOKENS)], params)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    usage = engine.memory_usage()
    return {"case": case, "estimate_weights": estimate.weights_bytes, "estimate_kv": estimate.kv_bytes,
            "estimate_activations": estimate.activation_bytes, "estimate_total": estimate.total_bytes,
            "engine_weights": usage.weights_bytes, "engine_kv": usage.kv_cache_bytes,
            "device_used": total - free - used_before, "loaded_used": total - loaded_free - used_before,
            "loaded_reserved": loaded_reserved, "run_peak_reserved": torch.cuda.max_memory_reserved(device),
            "run_peak_allocated": torch.cuda.max_memory_allocated(device),
            "end_reserved": torch.cuda.memory_reserved(device)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return
    gib = 1 << 30
    print(f"{'case':34} {'est. weights':>12} {'est. KV':>9} {'est. act.':>9} {'est. total':>10} "
          f"{'engine w.':>9} {'engine KV':>9} {'loaded':>7} {'peak alloc':>10} {'peak res.':>9} "
          f"{'device used':>11} {'used/est.':>9}  (GiB)")
    for case in sys.argv[1:] or CASES:
        done = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-3000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{case:34} {r['estimate_weights'] / gib:12.3f} {r['estimate_kv'] / gib:9.3f} "
              f"{r['estimate_activations'] / gib:9.3f} {r['estimate_total'] / gib:10.3f} "
              f"{r['engine_weights'] / gib:9.3f} {r['engine_kv'] / gib:9.3f} {r['loaded_used'] / gib:7.3f} "
              f"{r['run_peak_allocated'] / gib:10.3f} {r['run_peak_reserved'] / gib:9.3f} "
              f"{r['device_used'] / gib:11.3f} {r['device_used'] / r['estimate_total']:9.3f}", flush=True)


if __name__ == "__main__":
    main()
