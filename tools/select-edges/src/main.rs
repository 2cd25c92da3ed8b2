//! `select-edges`: top-C connections from an existing `edges.parquet`, so sweeping C does not
//! recompute scores.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use scae::scores::{select, SelectConfig};

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
    let cfg = SelectConfig {
        edges: args.edges.clone(),
        c: args.c,
        embed_c: args.embed_c,
        unembed_c: args.unembed_c,
        random: args.random,
    };
    let sel = select(&cfg)?;
    sel.write(&args.out)?;
    let conns = &sel.conns;
    let kind = if args.random.is_some() { "random " } else { "" };
    let mut embed = match conns.n_embed_edges() {
        0 => String::new(),
        n => format!(" + {n} from the embedding"),
    };
    if conns.n_unembed_edges() > 0 {
        embed.push_str(&format!(" + {} into the unembedding", conns.n_unembed_edges()));
    }
    scae::say!("select-edges: {} {kind}connections (C={}){embed} -> {}", conns.n_edges(), sel.c, args.out.display())?;
    Ok(())
}
