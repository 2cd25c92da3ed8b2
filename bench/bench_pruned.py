"""Benchmark: one pruned forward + backward step (MSE loss), scae vs the reference
`SCAESuite.forward_pruned` + `backward`, same CPU, sizes, connections and threads.

Not a test. Needs the Python venv of tests/fixtures/gen_models.py, a checkout of the reference
(jacobcd52/dictionary_learning) and `cargo build --release --example bench_pruned --features scae/oracle`.

    python bench/bench_pruned.py --ref /tmp/dl-ref [--threads 2] [--quick] [--only 64:16:16,...]

Model: random GPT-Neo, 4 layers, 4 heads, ctx 128, batch 8 (1024 tokens), vocab 512; suite
with k = 32; random connections with exactly C edges per downstream feature, spread over the
preceding modules (reference layout, so both sides read the same file). Prints a markdown
table of milliseconds per step (median and best of the timed steps) and the speedups.
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
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
import gen_suite  # noqa: E402  (reference import shim, TL local-folder lookup)


def make_model(folder, d_model, n_heads=4, vocab=512, max_pos=256):
    """A random GPT-Neo of 4 layers (the defaults: the toy benchmark model; d_model 768,
    16 heads, vocab 50,257 and 2,048 positions: TinyStories-33M's exact config)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, AutoTokenizer
    cfg = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=max_pos, hidden_size=d_model, num_layers=4,
                       attention_types=[[["global", "local"], 2]], num_heads=n_heads, window_size=256,
                       activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
    cfg.architectures = ["GPTNeoForCausalLM"]
    torch.manual_seed(0)
    GPTNeoForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests/fixtures/models/tiny-neo")).save_pretrained(folder)


def random_connections(names, f, c, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for d in names:
        dl, dt = int(d.split("_")[1]), d.split("_")[0]
        ups = [u for u in names if int(u.split("_")[1]) < dl or (int(u.split("_")[1]) == dl and u.startswith("attn") and dt == "mlp")]
        out[d] = {}
        if not ups:
            continue
        # every feature: c distinct (up, feature) pairs
        tables = {u: torch.full((f, c), -1, dtype=torch.long) for u in ups}
        for i in range(f):
            flat = torch.randperm(len(ups) * f, generator=g)[:c]
            fill = {u: 0 for u in ups}
            for v in sorted(flat.tolist()):
                u = ups[v // f]
                tables[u][i, fill[u]] = v % f
                fill[u] += 1
        out[d] = tables
    return out


def time_reference(suite, cache, steps):
    """(median, best) milliseconds per step."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        recon = suite.forward_pruned(cache)
        loss = gen_suite.fvu_loss(cache, recon)
        loss.backward()
        suite.zero_grad()
        if i > 0:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one size only")
    ap.add_argument("--only", help="d_model:expansion:C[,...], e.g. 64:16:16 (default: all)")
    ap.add_argument("--ref-steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    SCAESuite = gen_suite.import_reference(os.path.abspath(a.ref))
    work = os.path.join(tempfile.gettempdir(), "scae-bench-pruned")
    os.makedirs(work, exist_ok=True)
    binary = os.path.join(ROOT, "target/release/examples/bench_pruned")
    sizes = [(64, 4), (64, 16), (128, 4), (128, 16)] if not a.quick else [(64, 4)]
    cs = [8, 16, 64] if not a.quick else [16]
    only = None
    if a.only:
        only = {tuple(int(x) for x in item.split(":")) for item in a.only.split(",")}
        sizes = sorted({(d, e) for d, e, _ in only})
        cs = sorted({c for _, _, c in only})
    rows = []
    for d_model, exp in sizes:
        folder = os.path.join(work, f"neo-d{d_model}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            make_model(folder, d_model)
        tl = gen_suite.load_tl(folder)
        f = exp * d_model
        tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
        tok_path = os.path.join(work, "tokens.safetensors")
        save_file({"tokens": tokens}, tok_path)
        _, cache = tl.run_with_cache(tokens)
        for c in cs:
            if only is not None and (d_model, exp, c) not in only:
                continue
            suite = SCAESuite(tl, k=32, n_features=f, connections=None, device="cpu")
            gen_suite.randomize_suite(suite, seed=1)
            suite_path = os.path.join(work, f"suite-d{d_model}-f{f}.safetensors")
            save_file({k: v.detach().contiguous() for k, v in suite.state_dict().items() if k.startswith("aes.")},
                      suite_path, metadata={"k": "32", "n_features": str(f)})
            conns = random_connections(suite.submodule_names, f, c, seed=c)
            conn_path = os.path.join(work, f"conn-d{d_model}-f{f}-c{c}.safetensors")
            save_file({f"{d}.{u}": t for d in conns for u, t in conns[d].items()}, conn_path)
            suite.connections = conns
            suite._process_connections()
            ref_med, ref_best = time_reference(suite, cache, steps=a.ref_steps)
            env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
            line = subprocess.run([binary, folder, suite_path, conn_path, tok_path, "9"], env=env,
                                  check=True, capture_output=True, text=True).stdout
            ours = json.loads(line)
            med, best = ours["step_ms"], ours["min_step_ms"]
            rows.append((d_model, f, c, ref_med, ref_best, med, best))
            print(f"d_model {d_model} F {f} C {c}: reference {ref_med:.0f} ms (best {ref_best:.0f}), "
                  f"scae {med:.1f} ms (best {best:.1f}), x{ref_med / med:.1f} (best x{ref_best / best:.1f})", file=sys.stderr)
    # Median and best of the timed steps on each side (the best is steadier on a shared machine).
    print("\n| d_model | F | C | reference ms/step median (best) | scae ms/step median (best) | speedup median (best) |")
    print("|---|---|---|---|---|---|")
    for d, f, c, rm, rb, sm, sb in rows:
        print(f"| {d} | {f} | {c} | {rm:.0f} ({rb:.0f}) | {sm:.1f} ({sb:.1f}) | {rm / sm:.1f}x ({rb / sb:.1f}x) |")


if __name__ == "__main__":
    main()
