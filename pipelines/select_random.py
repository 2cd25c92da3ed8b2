"""Random "fake connections" control (the reference's generate_fake_connections), and the
template for custom connection-selection scripts.

    python pipelines/select_random.py --connections edges/connections.parquet \
        --out random.parquet [--seed 0]

Reads a connections.parquet (columns down_module, down_feature, up_module, up_feature[, score]),
keeps how many edges every downstream feature takes from every upstream module, and replaces the
upstream features by distinct random ones of the same module. Writes a connections.parquet that
every scae tool taking --connections accepts. Needs pandas and pyarrow only.

To write your own selection: read edges.parquet (score-edges keeps the top --keep edges of
every feature with their signed scores), choose rows with pandas, and write the four columns
(uint32 feature columns) to a .parquet file.
"""

import argparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", required=True, help="connections.parquet to imitate")
    ap.add_argument("--out", required=True, help="output .parquet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-features", type=int, help="features per module (default: file metadata)")
    a = ap.parse_args()

    meta = pq.read_metadata(a.connections).metadata or {}
    n_features = a.n_features or int(meta.get(b"n_features", b"0"))
    if n_features <= 0:
        raise SystemExit(f"select_random: {a.connections}: no n_features in metadata; pass --n-features")
    df = pd.read_parquet(a.connections, columns=["down_module", "down_feature", "up_module", "up_feature"])
    rng = np.random.default_rng(a.seed)
    parts = []
    for (down, feat, up), group in df.groupby(["down_module", "down_feature", "up_module"], sort=False):
        picks = rng.choice(n_features, size=len(group), replace=False)
        parts.append(pd.DataFrame({"down_module": down, "down_feature": feat, "up_module": up, "up_feature": picks}))
    out = pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]
    out["down_feature"] = out["down_feature"].astype("uint32")
    out["up_feature"] = out["up_feature"].astype("uint32")
    tmp = a.out + ".tmp"
    out.to_parquet(tmp, index=False)
    import os
    os.replace(tmp, a.out)
    print(f"select_random: {len(out)} random connections -> {a.out}")


if __name__ == "__main__":
    main()
