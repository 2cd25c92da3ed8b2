"""Random "fake connections" control (the reference's generate_fake_connections), and the
template for custom connection-selection scripts.

    python pipelines/select_random.py --edges edges/edges.parquet --c 16 --out random.parquet [--seed 0] [--embed-c 4]

Same interface as `select-edges`, so `make all SELECT="python pipelines/select_random.py"` swaps it
in. It takes the top C edges of every downstream feature from edges.parquet (same order as
select-edges: |score| descending, then upstream module in suite order, then upstream feature),
keeps how many of them come from each upstream module, and replaces the upstream features by
distinct random ones of that module. Edges from the token embedding (up_module "embed",
up_feature = token id; `score-edges --embed`) are pooled into C the same way, or get their own
budget with --embed-c; their random replacements are distinct tokens among those the edges file
lists. Needs pandas and pyarrow only.

To write your own selection: read edges.parquet (score-edges keeps the top --keep edges of every
feature with signed scores), choose rows with pandas, and write the columns down_module,
down_feature, up_module, up_feature (uint32 features; score optional) to a .parquet file.
"""

import argparse
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def module_order(name):
    """Suite order; the embedding sorts after every module (select-edges' tie rule)."""
    if name == "embed":
        return 1 << 30
    kind, layer = name.split("_")
    return 2 * int(layer) + (kind == "mlp")


def top_c(df, c):
    """The first c edges of every downstream feature in select-edges' order."""
    df = df[df["score"] != 0].copy()
    df["_abs"] = -df["score"].abs()
    df["_up"] = df["up_module"].map(module_order)
    df = df.sort_values(["down_module", "down_feature", "_abs", "_up", "up_feature"], kind="stable")
    return df.groupby(["down_module", "down_feature"], sort=False).head(c).drop(columns=["_abs", "_up"])


def main():
    ap = argparse.ArgumentParser(description="random connections with the top-C edge counts")
    ap.add_argument("--edges", required=True, help="edges.parquet from score-edges")
    ap.add_argument("--c", type=int, required=True, help="connections per downstream feature")
    ap.add_argument("--out", required=True, help="output connections .parquet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-c", type=int, help="a separate budget for embed edges")
    a = ap.parse_args()

    meta = pq.read_metadata(a.edges).metadata or {}
    n_features = int(meta.get(b"n_features", b"0"))
    if n_features <= 0:
        raise SystemExit(f"select_random: {a.edges}: metadata lacks n_features; expected an edges.parquet from score-edges")
    edges = pd.read_parquet(a.edges)
    is_embed = edges["up_module"] == "embed"
    tokens = np.unique(edges.loc[is_embed, "up_feature"].to_numpy())
    if a.embed_c is None:
        chosen = top_c(edges, a.c)
    else:
        chosen = pd.concat([top_c(edges[~is_embed], a.c), top_c(edges[is_embed], a.embed_c)], ignore_index=True)
    rng = np.random.default_rng(a.seed)
    parts = []
    for (down, feat, up), group in chosen.groupby(["down_module", "down_feature", "up_module"], sort=False):
        pool = tokens if up == "embed" else n_features
        picks = rng.choice(pool, size=len(group), replace=False)
        parts.append(pd.DataFrame({"down_module": down, "down_feature": feat, "up_module": up, "up_feature": picks}))
    cols = ["down_module", "down_feature", "up_module", "up_feature"]
    out = pd.concat(parts, ignore_index=True) if parts else chosen[cols]
    out["down_feature"] = out["down_feature"].astype("uint32")
    out["up_feature"] = out["up_feature"].astype("uint32")
    tmp = a.out + ".tmp"
    out.to_parquet(tmp, index=False)
    os.replace(tmp, a.out)
    print(f"select_random: {len(out)} random connections (C={a.c}) -> {a.out}")


if __name__ == "__main__":
    main()
