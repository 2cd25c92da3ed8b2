"""Benchmark: `collect-acts` vs TransformerLens `run_with_cache` on the same CPU.

Not a test. Needs a Python with torch, transformers<5 and transformer_lens==2.18.* (see
tests/fixtures/gen_models.py) and a release build (`cargo build --release`).

    python bench/bench_collect.py [--threads 2] [--n-seqs 32] [--ctx 128] [--batch 16]

It builds a random model with TinyStories-33M's shape (GPT-Neo, d_model 768, 4 layers,
16 heads, vocab 50257) in a scratch folder, writes random tokens, then times
  * TL: `run_with_cache(tokens, return_type="loss", names_filter=<the cached hooks>)` plus
    moving the cache to CPU memory (what the reference buffer does per batch), and
  * scae: `collect-acts` (forward + writing shards, as it reports), and its whole process
    (also model load and TL weight processing),
with the same threads, and prints tokens/s of each and the ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_model(folder):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, AutoTokenizer
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=4,
                       attention_types=[[["global", "local"], 2]], num_heads=16, window_size=256,
                       activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)
    cfg.architectures = ["GPTNeoForCausalLM"]
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(cfg)
    model.save_pretrained(folder)
    # Any tokenizer will do: tokens are given directly. Reuse the fixture's.
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests/fixtures/models/tiny-neo")).save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-seqs", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "scae-bench"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    folder = os.path.join(a.work, "ts33m-random")
    make_model(folder)
    tok_path = os.path.join(a.work, "tokens.safetensors")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (a.n_seqs, a.ctx), generator=gen)
    save_file({"tokens": tokens}, tok_path)
    n_tok = a.n_seqs * a.ctx

    # TransformerLens
    torch.set_num_threads(a.threads)
    import transformer_lens.loading_from_pretrained as lfp
    lfp.get_official_model_name = lambda n: n
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tl = HookedTransformer.from_pretrained(folder, hf_model=AutoModelForCausalLM.from_pretrained(folder),
                                           tokenizer=AutoTokenizer.from_pretrained(folder),
                                           device="cpu", dtype=torch.float32)
    hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{s}" for l in range(4) for s in (
        "ln1.hook_scale", "ln2.hook_scale", "ln1.hook_normalized", "ln2.hook_normalized",
        "hook_attn_out", "hook_mlp_out", "attn.hook_pattern")]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, a.n_seqs, a.batch):
            _, cache = tl.run_with_cache(tokens[i:i + a.batch], return_type="loss",
                                         names_filter=lambda n: n in hooks)
            cache = {k: v.to("cpu", torch.float32) for k, v in cache.items()}
    t_tl = time.perf_counter() - t0
    del tl

    # scae
    out = os.path.join(a.work, "acts")
    binary = os.path.join(ROOT, "target/release/collect-acts")
    cmd = [binary, "--model", folder, "--tokens", tok_path, "--ctx-len", str(a.ctx), "--no-prepend-bos",
           "--batch-size", str(a.batch), "--threads", str(a.threads), "--out", out, "--overwrite"]
    t0 = time.perf_counter()
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    t_scae = time.perf_counter() - t0
    # collect-acts prints the throughput of its loop (forward + writing shards, no model load).
    loop_tok_s = float(line.rsplit(";", 1)[1].split()[0])
    res = {"tokens": n_tok, "threads": a.threads,
           "tl_tok_per_s": round(n_tok / t_tl),
           "scae_loop_tok_per_s": round(loop_tok_s),
           "scae_process_tok_per_s": round(n_tok / t_scae),
           "speedup_loop": round(loop_tok_s / (n_tok / t_tl), 2),
           "speedup_whole_process": round(t_tl / t_scae, 2)}
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
