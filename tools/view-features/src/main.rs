//! `view-features`: a static feature browser for a suite — one page per feature
//! (`index.html#<module>/<feature>`) with its firing frequency, activation histogram, top
//! activating contexts, examples from lower quantiles, logit lens, and its upstream and
//! downstream connections as links. Opens from `file://`: no server, no network; the data are
//! JavaScript files loaded by `<script>` tags.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::browse::{BrowseConfig, ViewConfig};

/// Write a static feature browser for a suite on an activation cache.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  view-features --acts acts/ --suite ft/ --connections c16.parquet --out view/\n  then open view/index.html (or view/index.html#mlp_1/42)\n\nFeatures come from the same pass as evaluate's: pruned with --connections, else the suite's\nstored connections, else all connections."
)]
struct Args {
    /// Activation cache folder (from collect-acts).
    #[arg(long)]
    acts: PathBuf,
    /// Suite: a scae suite folder or .safetensors, or a reference suite folder / hub id.
    #[arg(long)]
    suite: PathBuf,
    /// Connection set (.parquet, .safetensors, .pkl, .pt) or `all`; shown as each feature's links.
    /// Default: the suite's stored connections (those it was finetuned with), else all.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// edges.parquet from score-edges: scores for connections that carry none (default: none;
    /// such connections are listed without scores).
    #[arg(long)]
    edges: Option<PathBuf>,
    /// Output folder: index.html, app.js, style.css, data/.
    #[arg(long)]
    out: PathBuf,
    /// Top activating contexts per feature.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    top: u64,
    /// Also write features/<id>.json: each feature's page as the circuit-tracer / Neuronpedia
    /// graph UI loads it (<id>: the feature's number in an attribution graph).
    #[arg(long)]
    neuronpedia: bool,
    /// A folder of attribution graphs written by `attribute --out` (made with this suite), drawn
    /// in graph.html (default: none; graph.html then says how to add some). Graphs of more than
    /// 200,000 links (unpruned ones) are left out, said on stderr.
    #[arg(long)]
    graphs: Option<PathBuf>,
    /// Tokens of context left of the activating token (right: a third of it, at least 2).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=64))]
    context: u64,
    /// Memory (MB) for the features of the sequences holding top contexts, kept from the
    /// statistics pass for the why-it-fired pass; sequences beyond it are run through the pass
    /// again there (the same page, more time). The why-it-fired pass keeps up to as much again
    /// of the suite's and model's rows it reads (formed again beyond it: the same page).
    #[arg(long, default_value_t = 512)]
    keep_mb: u64,
    #[command(flatten)]
    cache: scae::cli::CacheRunArgs,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

/// The page itself; the library writes its data files beside it.
const ASSETS: [(&str, &str); 8] = [
    ("index.html", include_str!("../assets/index.html")),
    ("app.js", include_str!("../assets/app.js")),
    ("style.css", include_str!("../assets/style.css")),
    ("graph.html", include_str!("../assets/graph.html")),
    ("graph.js", include_str!("../assets/graph.js")),
    ("vendor/elk.bundled.js", include_str!("../assets/vendor/elk.bundled.js")),
    ("vendor/elkjs-LICENSE.md", include_str!("../assets/vendor/elkjs-LICENSE.md")),
    ("vendor/README.md", include_str!("../assets/vendor/README.md")),
];

fn main() -> ExitCode {
    // Under mpirun/srun -n N the pass over the batches is shared among the ranks.
    scae::cli::run_main_ranks("view-features", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn scae::util::collective::Collective) -> Result<()> {
    let named = [
        ("--acts", Some(args.acts.as_path())),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", args.connections.as_deref()),
        ("--edges", args.edges.as_deref()),
        ("--graphs", args.graphs.as_deref()),
    ];
    scae::util::io::refuse_overlap(&args.out, "--out", &named)?;
    let device = args.common.setup()?;
    let left = args.context as usize;
    let cfg = ViewConfig {
        acts: args.acts,
        suite: args.suite,
        connections: args.connections,
        edges: args.edges,
        model: args.cache.model.clone(),
        out: args.out,
        overwrite: args.cache.overwrite,
        neuronpedia: args.neuronpedia,
        graphs: args.graphs,
        browse: BrowseConfig {
            batch_size: args.cache.batch_size as usize,
            limit: args.cache.limit(),
            top_n: args.top as usize,
            left,
            right: (left / 3).max(2),
            hist_samples: 256,
            sample_contexts: 9,
            lens: 10,
            pass: args.pass.options(),
            seed: args.common.seed,
            keep_entries: (args.keep_mb as usize) << 17,
        },
    };
    let Some(s) = scae::browse::run(&cfg, &ASSETS, &device, coll)? else { return Ok(()) };
    scae::say!(
        "view-features: {} features ({} firing) over {} tokens, {:.1} MB -> {}",
        s.n_features,
        s.firing,
        s.n_tokens,
        s.bytes as f64 / 1e6,
        s.index.display()
    )?;
    Ok(())
}
