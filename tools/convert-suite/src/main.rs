//! `convert-suite`: a suite (and its connections) between scae's files and the Python
//! reference's (`config.json` + `checkpoint.pt`, as `SCAESuite.upload_to_hf` writes and
//! `from_pretrained` reads), or out to SAELens (`--to saelens`, `scae::formats::saelens`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use candle_core::Device;
use clap::{Parser, ValueEnum};
use scae::formats::connections::{Connections, FORMAT};
use scae::formats::edges_meta::{EdgesMeta, Key};
use scae::formats::reference::SIDECAR;
use scae::formats::suite::{Suite, SuiteConfig};
use scae::inputs::is_all;

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum To {
    /// config.json + checkpoint.pt, connections embedded (the reference's HF suite repos).
    Reference,
    /// suite.safetensors + config.json (+ connections.parquet).
    Scae,
    /// One SAELens 6 folder per module (`topk`; transcoders with a README on what that means).
    Saelens,
}

/// Convert a suite between scae's layout and the Python reference's.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  convert-suite --suite ft/ --connections c16.parquet --to reference --out ref-suite/\n  convert-suite --suite jacobcd52/TinyStories-33M_suite_4 --connections top_connections_16.pkl --to scae --out suite/\n\nThe reference loads the result as its own: t.load(checkpoint.pt), pop `connections`,\nload_state_dict(strict=False)."
)]
struct Args {
    /// Suite: a scae suite folder, a reference folder (config.json + checkpoint.pt) or its hub id.
    #[arg(long)]
    suite: PathBuf,
    /// Connections to carry along (.parquet, .safetensors, .pkl, .pt), or `all` for none.
    /// Default: the suite's stored connections, if any.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// Layout to write.
    #[arg(long, value_enum)]
    to: To,
    /// Model folder or hub id, only to check connections against its block type (Pythia's
    /// parallel attn/MLP); without it edges are checked as for sequential blocks, unless a
    /// connections parquet records the block type (default: none).
    #[arg(long)]
    model: Option<String>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
    /// With --to saelens: also write each module's sparsity.safetensors (log10 firing frequency
    /// of its features) over this activation cache (default: none, no sparsity file).
    #[arg(long)]
    acts: Option<PathBuf>,
}

fn main() -> ExitCode {
    scae::cli::run_main("convert-suite", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    let named = [("--suite", Some(args.suite.as_path())), ("--connections", args.connections.as_deref())];
    scae::util::io::refuse_overlap(&args.out, "--out", &named)?;
    // A hub id becomes its snapshot folder, so that its files (config, sidecar) are found.
    let args = Args { suite: scae::inputs::resolve_suite(&args.suite)?, ..args };
    // The connections parquet given, or the one kept beside a reference folder scae wrote.
    let sidecar = args.suite.join(SIDECAR);
    let file = match &args.connections {
        Some(p) if p.extension().is_some_and(|e| e == "parquet") => Some(p.clone()),
        None if sidecar.is_file() => Some(sidecar),
        _ => None,
    };
    let parallel = scae::inputs::block_type(args.model.as_deref(), file.as_deref())?;
    let suite = Suite::load(&args.suite, &Device::Cpu)?;
    let conns: Option<Connections> = match (&args.connections, &suite.embedded) {
        (Some(p), _) if is_all(p) => None,
        (Some(p), _) => Some(Connections::load(p, &suite.modules, suite.n_features, parallel)?),
        (None, Some(e)) => Some(e.connections(&suite.modules, suite.n_features, parallel)?),
        (None, None) => None,
    };
    let parquet = args.connections.as_deref().filter(|p| !is_all(p) && p.extension().is_some_and(|e| e == "parquet"));
    let stage = scae::util::io::StagedDir::create(&args.out, args.overwrite, "--out")?;
    let dir = stage.path();
    match args.to {
        To::Reference => {
            let scae_cfg = SuiteConfig::read(&args.suite);
            suite.write_reference(dir, scae_cfg.as_ref(), conns.as_ref(), parallel, parquet)?;
        }
        To::Saelens => scae::formats::saelens::write(dir, &suite, &args.suite, args.acts.as_deref())?,
        To::Scae => {
            let created_by = format!("convert-suite {}", env!("CARGO_PKG_VERSION"));
            suite.save_converted(dir, &args.suite, &created_by)?;
            if let Some(c) = &conns {
                write_connections(&args, c, parallel, &dir.join("connections.parquet"))?;
            }
        }
    }
    let out = stage.commit()?;
    let what = match &conns {
        Some(c) if args.to != To::Saelens => format!(" with {} connections", c.n_edges()),
        _ => String::new(),
    };
    scae::say!(
        "convert-suite: {} modules, F {}, k {}{what} -> {}",
        suite.modules.len(),
        suite.n_features,
        suite.k,
        out.display()
    )?;
    Ok(())
}

/// connections.parquet for `c`: the sidecar parquet of a folder scae wrote when it holds the
/// same edges (exact round trip), else written anew.
fn write_connections(args: &Args, c: &Connections, parallel: bool, path: &Path) -> Result<()> {
    let sidecar = args.suite.join(SIDECAR);
    if args.connections.is_none() && sidecar.is_file() {
        let kept = Connections::load(&sidecar, &c.modules, c.n_features, parallel)?;
        if kept.edge_set() == c.edge_set() {
            std::fs::copy(&sidecar, path).map_err(|e| anyhow::anyhow!("{}: cannot copy: {e}", sidecar.display()))?;
            return Ok(());
        }
        scae::note!(
            "convert-suite: {} no longer matches the checkpoint's connections; writing them anew",
            sidecar.display()
        );
    }
    let width = c.edges.iter().flatten().map(Vec::len).max().unwrap_or(0);
    let source = args.connections.as_deref().unwrap_or(args.suite.as_path()).display().to_string();
    let mut meta = EdgesMeta::new().with(Key::C, width).with(Key::Source, source);
    if args.model.is_some() || parallel {
        meta.set(Key::ParallelAttnMlp, parallel);
    }
    c.write_parquet(path, FORMAT, &meta)?;
    Ok(())
}
