"""Benchmark: finetuning throughput (tokens/s) and peak memory, scae `finetune` vs the
reference's training step (docs/MATH.md, "Optimizer and clipping": forward_pruned, FVU loss, backward, per-AE clipping, Adam),
on the same CPU, sizes, connections (C=16) and threads.

Not a test. Needs the Python venv of tests/fixtures/gen_models.py, a reference checkout and a
release build (`cargo build --release --workspace`).

    python bench/bench_finetune.py --ref /tmp/dl-ref [--threads 2] [--steps 3] [--shape tinystories-33m]

`--shape toy` (default): random 4-layer GPT-Neos with 4 heads, vocab 512, k 32, at three
(d_model, F). `--shape tinystories-33m`: a random model of TinyStories-33M's exact config
(d_model 768, 16 heads, vocab 50,257), F 3072, k 64 (the reference's published suites); its
reference step takes minutes and ~14 GB, so use `--steps 1`.

The reference is timed on a precomputed TransformerLens cache (its buffer's model forward is
left out, which favours the reference); scae reads the same activations from a collect-acts
cache. Peak memory is each process's maximum resident set size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
import bench_pruned  # noqa: E402
import gen_suite  # noqa: E402


def reference_child(a):
    """Run in a child process so its peak RSS is its own."""
    torch.set_num_threads(a.threads)
    SCAESuite = gen_suite.import_reference(os.path.abspath(a.ref))
    tl = gen_suite.load_tl(a.folder)
    tokens = torch.load(a.tokens_pt)
    _, cache = tl.run_with_cache(tokens)
    suite = SCAESuite(tl, k=a.k, n_features=a.f, connections=None, device="cpu")
    gen_suite.randomize_suite(suite, seed=1)
    conns = bench_pruned.random_connections(suite.submodule_names, a.f, 16, seed=16)
    suite.connections = conns
    suite._process_connections()
    opt = torch.optim.Adam([{"params": ae.parameters()} for ae in suite.aes.values()], lr=1e-3)
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        recon = suite.forward_pruned(cache)
        loss = gen_suite.fvu_loss(cache, recon)
        loss.backward()
        for ae in suite.aes.values():
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - t0)
    n_tok = tokens.numel()
    print(json.dumps({"tok_s": n_tok / (sum(times) / len(times)),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--folder")
    ap.add_argument("--f", type=int)
    ap.add_argument("--tokens-pt")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--shape", choices=["toy", "tinystories-33m"], default="toy")
    a = ap.parse_args()
    if a.child:
        return reference_child(a)
    work = os.path.join(tempfile.gettempdir(), "scae-bench-finetune")
    os.makedirs(work, exist_ok=True)
    bin_dir = os.path.join(ROOT, "target", "release")
    rows = []
    if a.shape == "toy":
        shapes, heads, vocab, max_pos, k = [(64, 1024), (128, 512), (128, 2048)], 4, 512, 256, 32
    else:
        shapes, heads, vocab, max_pos, k = [(768, 3072)], 16, 50257, 2048, 64
    for d_model, f in shapes:
        folder = os.path.join(work, f"neo-d{d_model}-h{heads}-v{vocab}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            bench_pruned.make_model(folder, d_model, heads, vocab, max_pos)
        tokens = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
        tok_pt = os.path.join(work, "tokens.pt")
        torch.save(tokens, tok_pt)
        tok_st = os.path.join(work, "tokens.safetensors")
        save_file({"tokens": tokens}, tok_st)
        ref = subprocess.run([sys.executable, __file__, "--child", "--ref", a.ref, "--threads", str(a.threads),
                              "--steps", str(a.steps), "--folder", folder, "--f", str(f), "--k", str(k),
                              "--tokens-pt", tok_pt],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        ref = json.loads(ref)
        # scae: cache, suite and connections equal in shape (random values from the same recipe).
        acts = os.path.join(work, f"acts-d{d_model}-h{heads}-v{vocab}")
        subprocess.run([os.path.join(bin_dir, "collect-acts"), "--model", folder, "--tokens", tok_st, "--ctx-len", "128",
                        "--no-prepend-bos", "--out", acts, "--overwrite"], check=True, capture_output=True)
        # suite + connections written by bench_pruned's recipe
        SCAESuite = gen_suite.import_reference(os.path.abspath(a.ref))
        tl = gen_suite.load_tl(folder)
        suite = SCAESuite(tl, k=k, n_features=f, connections=None, device="cpu")
        gen_suite.randomize_suite(suite, seed=1)
        suite_path = os.path.join(work, f"suite-d{d_model}-f{f}-k{k}.safetensors")
        save_file({n: v.detach().contiguous() for n, v in suite.state_dict().items() if n.startswith("aes.")},
                  suite_path, metadata={"k": str(k), "n_features": str(f)})
        conns = bench_pruned.random_connections(suite.submodule_names, f, 16, seed=16)
        conn_path = os.path.join(work, f"conn-d{d_model}-f{f}.safetensors")
        save_file({f"{dd}.{u}": t for dd in conns for u, t in conns[dd].items()}, conn_path)
        out = os.path.join(work, "ft")
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        res = subprocess.run(["/usr/bin/time", "-f", "%M", os.path.join(bin_dir, "finetune"), "--acts", acts,
                              "--suite", suite_path, "--connections", conn_path, "--out", out, "--overwrite",
                              "--steps", str(max(a.steps + 1, 6)), "--batch-size", "8"],
                             env=env, check=True, capture_output=True, text=True)
        tok_s = float(res.stdout.strip().split("(")[-1].split()[0])
        rss = int(res.stderr.strip().splitlines()[-1]) / 1024
        rows.append((d_model, f, ref["tok_s"], tok_s, ref["rss_mb"], rss))
        print(f"d {d_model} F {f}: reference {ref['tok_s']:.0f} tok/s {ref['rss_mb']:.0f} MB; "
              f"scae {tok_s:.0f} tok/s {rss:.0f} MB", file=sys.stderr)
    print(f"\n{heads} heads, k {k}, 8 x 128 tokens per step, {a.threads} threads")
    print("\n| d_model | F | C | reference tok/s | scae tok/s | speedup | reference peak MB | scae peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | 16 | {r[2]:.1f} | {r[3]:.0f} | {r[3] / r[2]:.1f}x | {r[4]:.0f} | {r[5]:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
