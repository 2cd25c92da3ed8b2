//! Benchmark helper (not a test): random connections for a suite, for timing `finetune` and
//! `evaluate` at sizes where `score-edges` would dominate the benchmark (it forms every F×F
//! pair of scores: on GPT-2 small at F 24,576, 276 pairs × F² × 768 ≈ 128 T multiply-adds).
//!
//! `random_connections SUITE C SEED OUT [parallel]` writes `OUT` (connections.parquet): every
//! downstream feature gets C distinct upstream features drawn uniformly from all features of
//! its preceding modules (`parallel`: GPT-NeoX's parallel blocks).
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use scae::formats::connections::{Connections, Edge, FORMAT};
use scae::formats::suite::Suite;
use scae::util::rng::SplitMix;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [suite, c, seed, out, rest @ ..] = args.as_slice() else {
        bail!("usage: random_connections SUITE C SEED OUT [parallel]");
    };
    let parallel = matches!(rest, [p] if p == "parallel");
    let c: usize = c.parse().context("C")?;
    let mut rng = SplitMix(seed.parse().context("SEED")?);
    let suite = Suite::load(Path::new(suite), &Device::Cpu)?;
    let f = suite.n_features;
    let mut conns = Connections::empty(&suite.modules, f);
    for (d, dm) in suite.modules.iter().enumerate() {
        let ups: Vec<usize> = (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(dm, parallel)).collect();
        let pool = ups.len() * f;
        for edges in conns.edges[d].iter_mut() {
            while edges.len() < c.min(pool) {
                let m = (rng.next_u64() % pool as u64) as usize;
                let e = Edge { up: ups[m / f], feature: (m % f) as u32, score: f32::NAN };
                if !edges.iter().any(|x| x.up == e.up && x.feature == e.feature) {
                    edges.push(e);
                }
            }
        }
    }
    conns.write_parquet(Path::new(out), FORMAT, &scae::formats::edges_meta::EdgesMeta::new())?;
    eprintln!("random_connections: {} edges -> {out}", conns.n_edges());
    Ok(())
}
