//! `select-edges`: top-C connections from an existing `edges.parquet`, so sweeping C does not
//! recompute scores.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use scae::formats::connections::{Connections, FORMAT};
use scae::model::Module;
use scae::scores::select_top_c;

/// Keep the top C edges of every downstream feature of an edges file.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  select-edges --edges edges/edges.parquet --c 16 --out connections.parquet\n\nOrder: |score| descending, then upstream module (suite order), then upstream feature;\nzero scores are never selected. --random SEED: the same per-module counts, random features."
)]
struct Args {
    /// edges.parquet written by score-edges.
    #[arg(long)]
    edges: PathBuf,
    /// Connections kept per downstream feature (across all upstream modules).
    #[arg(long)]
    c: usize,
    /// Output connections.parquet (a file; refused if it exists, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    overwrite: bool,
    /// A separate budget for edges from the token embedding (up_module `embed`): each feature
    /// keeps its top C module edges and its top EMBED_C embed edges. Without it, embed edges
    /// compete with the modules' for the C slots (the default).
    #[arg(long, value_name = "EMBED_C")]
    embed_c: Option<usize>,
    /// Also wire each output token to its top UNEMBED_C features (edges into the unembedding,
    /// from `score-edges --unembed`). Default: none; every token reads every feature.
    #[arg(long, value_name = "UNEMBED_C")]
    unembed_c: Option<usize>,
    /// The random-connections control (the reference's "fake connections"): each feature
    /// keeps its top-C count of edges per upstream module, but with distinct random upstream
    /// features of that module, drawn with this seed (default: the top-C connections).
    #[arg(long, value_name = "SEED")]
    random: Option<u64>,
}

fn main() -> ExitCode {
    scae::cli::run_main("select-edges", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    let out = args.out.display();
    if args.out.is_dir() || args.out.as_os_str().to_string_lossy().ends_with('/') {
        let dir = out.to_string();
        let dir = dir.trim_end_matches('/');
        let found = if args.out.is_dir() { "a folder" } else { "a folder name (it ends in /)" };
        bail!("{out}: --out: expected a file to write, found {found}; hint: name a file in it, e.g. --out {dir}/connections.parquet");
    }
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        bail!("{out}: --out: the folder {} does not exist; hint: create it first", parent.display());
    }
    scae::util::io::refuse_overlap(&args.out, "--out", &[("--edges", Some(args.edges.as_path()))])?;
    if args.out.is_file() && !args.overwrite {
        bail!("{out}: --out: file exists; hint: pass --overwrite to replace it");
    }
    let _lock = scae::util::io::OutputLock::take(&args.out, "--out")?;
    let meta: std::collections::HashMap<String, String> =
        scae::util::table::parquet_metadata(&args.edges)?.into_iter().collect();
    let path = args.edges.display();
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| anyhow!("{path}: metadata lacks `{k}`; hint: edges files are written by score-edges"))
    };
    // A connections file has the same columns; its rows are already a selection.
    if let Some(f) = meta.get("format").filter(|f| f.as_str() != scae::formats::connections::EDGES_FORMAT) {
        bail!(
            "{path}: metadata `format`: expected {}, found {f}; hint: edges files are written by score-edges",
            scae::formats::connections::EDGES_FORMAT
        );
    }
    let n_features: usize =
        get("n_features")?.parse().map_err(|_| anyhow!("{path}: metadata `n_features` is not an integer"))?;
    let modules: Vec<Module> = get("modules")?
        .split(',')
        .map(|m| Module::parse(m).ok_or_else(|| anyhow!("{path}: metadata `modules`: `{m}` is not a module name")))
        .collect::<Result<_>>()?;
    let parallel = get("parallel_attn_mlp")? == "true";
    let keep: Option<usize> = meta.get("keep").and_then(|k| k.parse().ok());
    if let Some(k) = keep.filter(|&k| args.c > k) {
        scae::note!(
            "select-edges: warning: --c {} is above the {k} edges per feature kept in {path}; features get at most {k}",
            args.c
        );
    }
    let edges = Connections::load(&args.edges, &modules, n_features, parallel)?;
    // Ranking needs a finite score on every edge (a missing column or null reads as NaN).
    for (d, feats) in edges.edges.iter().enumerate() {
        for (i, es) in feats.iter().enumerate() {
            if let Some(e) = es.iter().find(|e| !e.score.is_finite()) {
                bail!(
                    "{path}: column `score`, edge {}:{} -> {}:{i}: expected a finite score, found {} (a missing column or a null reads as NaN); hint: edges files are written by score-edges",
                    modules[e.up].name(), e.feature, modules[d].name(), e.score
                );
            }
            if let Some(e) = edges.embed[d][i].iter().find(|e| !e.score.is_finite()) {
                bail!(
                    "{path}: column `score`, edge {}:{} -> {}:{i}: expected a finite score, found {} (a missing column or a null reads as NaN); hint: edges files are written by score-edges",
                    scae::formats::connections::EMBED, e.token, modules[d].name(), e.score
                );
            }
        }
    }
    for (v, es) in edges.unembed.iter().enumerate() {
        if let Some(e) = es.iter().find(|e| !e.score.is_finite()) {
            bail!(
                "{path}: column `score`, edge {}:{} -> {}:{v}: expected a finite score, found {}; hint: edges files are written by score-edges",
                modules[e.up].name(), e.feature, scae::formats::connections::UNEMBED, e.score
            );
        }
    }
    let mut conns = select_top_c(&edges, args.c, args.embed_c);
    if let Some(uc) = args.unembed_c {
        if edges.n_unembed_edges() == 0 {
            bail!("{path}: --unembed-c {uc}: the file has no unembed edges; hint: score with score-edges --unembed");
        }
        conns.unembed = scae::scores::select_unembed(&edges, uc);
    }
    if let Some(seed) = args.random {
        conns = scae::scores::randomize_like(&conns, seed);
    }
    // The C achieved: at most the edges each feature has.
    let c = conns.edges.iter().flatten().map(Vec::len).max().unwrap_or(0).min(args.c);
    let mut m: Vec<(&str, String)> = vec![("parallel_attn_mlp", parallel.to_string()), ("c", c.to_string())];
    m.push(("edges", path.to_string()));
    // The suite the edges were scored for: tools warn when the connections meet another suite.
    for k in ["suite", "suite_id"] {
        if let Some(v) = meta.get(k) {
            m.push((k, v.clone()));
        }
    }
    if let Some(seed) = args.random {
        m.push(("random_seed", seed.to_string()));
    }
    if let Some(ce) = args.embed_c {
        m.push(("embed_c", ce.to_string()));
    }
    if let Some(uc) = args.unembed_c {
        m.push(("unembed_c", uc.to_string()));
    }
    conns.write_parquet(&args.out, FORMAT, &m)?;
    let kind = if args.random.is_some() { "random " } else { "" };
    let mut embed = match conns.n_embed_edges() {
        0 => String::new(),
        n => format!(" + {n} from the embedding"),
    };
    if conns.n_unembed_edges() > 0 {
        embed.push_str(&format!(" + {} into the unembedding", conns.n_unembed_edges()));
    }
    scae::say!("select-edges: {} {kind}connections (C={c}){embed} -> {}", conns.n_edges(), args.out.display())?;
    Ok(())
}
