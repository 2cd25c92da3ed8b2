"""Benchmark: suite pretraining throughput at TinyStories-33M's shape, the reference's TopK
trainer (`trainers/top_k.py: TrainerTopK.update`: loss with AuxK, backward, clipping, decoder
normalisation and parallel-gradient removal, Adam) for each of the 8 modules vs scae's
`train-suite` (bench/real-shapes.sh reports it), same CPU and threads.

Not a test. Needs the Python venv of tests/fixtures/gen_models.py and a reference checkout.

    python bench/bench_train.py --ref /tmp/dl-ref [--threads 2] [--steps 5]

d_model 768, F 3072, k 64, 8 x 128 tokens per step, random activations (the cost does not
depend on their values). Prints the reference's seconds per suite step and tokens/s.
"""

import argparse
import os
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "fixtures"))
import gen_suite  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen_suite.import_reference(os.path.abspath(a.ref))
    from trainers.top_k import TrainerTopK

    d, f, k, n, modules = 768, 3072, 64, 8 * 128, 8
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for m in range(modules):
        tr = TrainerTopK(activation_dim=d, dict_size=f, k=k, layer=m // 2, lm_name="bench", device="cpu",
                         steps=1000, decay_start=800)
        xs = [torch.randn(n, d, generator=g) for _ in range(a.steps + 1)]
        tr.update(0, xs[0])  # step 0 also sets b_dec to the geometric median: not timed
        t0 = time.perf_counter()
        for i in range(1, a.steps + 1):
            tr.update(i, xs[i])
        total += (time.perf_counter() - t0) / a.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"reference TopK trainer, {modules} modules, d {d}, F {f}, k {k}, {n} tokens per step, {a.threads} threads: "
          f"{total:.3f} s per suite step, {n / total:.0f} tokens/s, peak {rss:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
