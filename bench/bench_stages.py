"""Benchmark: edge scoring and evaluation at TinyStories-33M's shape, scae vs the reference,
same CPU, model, suite, connections and threads (finetuning: bench_finetune.py).

Not a test. Needs the Python venv of tests/fixtures/gen_models.py, a reference checkout and a
release build (`cargo build --release --workspace`). Run bench_finetune.py --shape
tinystories-33m first: it writes the random model, tokens, cache, suite and connections this
script reuses (under the temp dir's scae-bench-finetune/).

    python bench/bench_stages.py --ref /tmp/dl-ref [--threads 2]

Reference, one batch of 8 x 128 tokens on a precomputed TransformerLens cache (its model
forward left out, which favours it): scoring = `find_top_connections.get_avg_contribs`' work
for the batch (`forward_pruned` with all connections, then `get_pruned_contribs_*` with
`avg_f_by_f` for every module pair); evaluation = `forward_pruned` with the connections and
`get_ce_loss`. scae: `score-edges` and `evaluate` on the same batch as whole processes (model
and cache loading included; evaluate also computes the clean and zero-ablation CE).
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
    suite = SCAESuite(tl, k=64, n_features=3072, connections=None, device="cpu")
    gen_suite.randomize_suite(suite, seed=1)
    with torch.no_grad():
        if a.stage == "score":
            t0 = time.perf_counter()
            gen_suite.avg_contribs(suite, cache)
        else:
            suite.connections = bench_pruned.random_connections(suite.submodule_names, 3072, 16, seed=16)
            suite._process_connections()
            t0 = time.perf_counter()
            recon = suite.forward_pruned(cache)
            suite.get_ce_loss(cache, recon, tokens)
        secs = time.perf_counter() - t0
    print(json.dumps({"secs": secs, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def timed(cmd, env):
    """Wall seconds and peak RSS (MB) of a scae tool run."""
    res = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], env=env, check=True, capture_output=True, text=True)
    secs, kb = res.stderr.strip().splitlines()[-1].split()
    return float(secs), int(kb) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--stage", choices=["score", "eval"])
    ap.add_argument("--folder")
    ap.add_argument("--tokens-pt")
    a = ap.parse_args()
    if a.child:
        return reference_child(a)
    work = os.path.join(tempfile.gettempdir(), "scae-bench-finetune")
    folder = os.path.join(work, "neo-d768-h16-v50257")
    acts = os.path.join(work, "acts-d768-h16-v50257")
    suite = os.path.join(work, "suite-d768-f3072-k64.safetensors")
    conns = os.path.join(work, "conn-d768-f3072.safetensors")
    for p in (folder, acts, suite, conns):
        if not os.path.exists(p):
            raise SystemExit(f"bench_stages: {p} is missing; run bench_finetune.py --shape tinystories-33m first")
    tok_pt = os.path.join(work, "tokens.pt")
    n_tok = torch.load(tok_pt).numel()
    bin_dir = os.path.join(ROOT, "target", "release")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rows = []
    for stage in ["score", "eval"]:
        ref = subprocess.run([sys.executable, __file__, "--child", "--ref", a.ref, "--threads", str(a.threads),
                              "--stage", stage, "--folder", folder, "--tokens-pt", tok_pt],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        ref = json.loads(ref)
        out = os.path.join(work, f"out-{stage}")
        if stage == "score":
            cmd = [os.path.join(bin_dir, "score-edges"), "--acts", acts, "--suite", suite, "--batch-size", "8",
                   "--out", out, "--overwrite"]
        else:
            cmd = [os.path.join(bin_dir, "evaluate"), "--acts", acts, "--suite", suite, "--connections", conns,
                   "--batch-size", "8", "--out", out, "--overwrite"]
        secs, rss = timed(cmd, env)
        rows.append((stage, ref["secs"], ref["rss_mb"], secs, rss))
        print(f"{stage}: reference {ref['secs']:.1f} s {ref['rss_mb']:.0f} MB; scae {secs:.2f} s {rss:.0f} MB",
              file=sys.stderr)
    print(f"\nTinyStories-33M shape, F 3072, k 64, {n_tok} tokens, {a.threads} threads")
    print("\n| stage | reference s | scae s (whole process) | speedup | reference peak MB | scae peak MB |")
    print("|---|---|---|---|---|---|")
    for stage, rs, rm, ss, sm in rows:
        print(f"| {stage} | {rs:.1f} | {ss:.2f} | {rs / ss:.1f}x | {rm:.0f} | {sm:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
