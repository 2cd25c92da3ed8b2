//! `attribute`: the exact attribution graph of one prompt (or one cached sequence) through a
//! suite's pruned pass, in the graph format circuit-tracer's and Neuronpedia's UI load
//! (`scae::attrib`, `scae::formats::graph_json`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::attrib::run::{Request, Source};
use scae::attrib::LogitChoice;

/// Write a prompt's attribution graph through a suite's pruned pass.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  attribute --suite ft/ --prompt \"Once upon a time\" --out graphs/\n  attribute --suite ft/ --acts heldout/ --seq 3 --no-prune --out graphs/\n  then view-features ... --graphs graphs/ (the graph view), or serve graphs/ to circuit-tracer's UI.\n\nEvery link is one exact term of its target's pre-activation (an upstream feature at a position,\nor a token's embedding); links + bias + upstream_bias + position + pruned_links = pre_activation."
)]
struct Args {
    /// Suite: a scae suite folder or .safetensors, or a reference suite folder / hub id.
    #[arg(long)]
    suite: PathBuf,
    /// Connection set (.parquet, .safetensors, .pkl, .pt) or `all`. Default: the suite's
    /// stored connections (those it was finetuned with), else all.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// Model folder or hub id (default: the cache's model with --acts, the suite's recorded
    /// model with --prompt).
    #[arg(long)]
    model: Option<String>,
    /// The text to attribute (default: none; give it or --acts with --seq).
    #[arg(long, conflicts_with_all = ["acts", "seq"], required_unless_present = "acts")]
    prompt: Option<String>,
    /// Activation cache holding the sequence (default: none, with --prompt).
    #[arg(long, requires = "seq")]
    acts: Option<PathBuf>,
    /// Index of the sequence in --acts (default: none, with --prompt).
    #[arg(long, requires = "acts")]
    seq: Option<u64>,
    /// Do not put BOS before the prompt's tokens (default: BOS first, as TransformerLens).
    #[arg(long)]
    no_prepend_bos: bool,
    /// Name of the graph: <out>/<slug>.json (default: the prompt's first words, or seq-<I>).
    #[arg(long)]
    slug: Option<String>,
    /// Output folder: <slug>.json and graph-metadata.json (the folder's list of graphs; other
    /// graphs in it are kept).
    #[arg(long)]
    out: PathBuf,
    /// Write every node and link (default: prune as circuit-tracer does).
    #[arg(long)]
    no_prune: bool,
    /// Keep the most influential features up to this share of the total influence.
    #[arg(long, default_value_t = 0.8, value_parser = share)]
    node_threshold: f64,
    /// Then keep the most influential links up to this share.
    #[arg(long, default_value_t = 0.98, value_parser = share)]
    edge_threshold: f64,
    /// Logit nodes: the most probable tokens up to this cumulative probability.
    #[arg(long, default_value_t = 0.95, value_parser = share)]
    logit_probability: f64,
    /// Logit nodes: at most this many.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_logits: u64,
    /// Refuse a graph with more links than this before pruning (24 bytes each; all connections
    /// at real sizes can reach billions).
    #[arg(long, default_value_t = 100_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_links: u64,
    /// metadata.scan: the UI's name for the feature set; `./DIR` makes circuit-tracer's UI read
    /// feature pages from DIR/<feature>.json (view-features --neuronpedia's features/) (default:
    /// scae-<suite id>).
    #[arg(long)]
    scan: Option<String>,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

fn share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("expected a share from 0 to 1, found {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    scae::cli::run_main("attribute", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    scae::util::collective::require_one_process("attribute")?;
    let source = match (args.prompt, args.acts, args.seq) {
        (Some(text), _, _) => Source::Prompt { text, bos: !args.no_prepend_bos },
        (None, Some(acts), Some(seq)) => Source::Cache { acts, seq: seq as usize },
        _ => anyhow::bail!("give --prompt TEXT, or --acts CACHE with --seq I"),
    };
    let req = Request {
        suite: args.suite,
        connections: args.connections,
        model: args.model,
        source,
        slug: args.slug,
        out: args.out,
        prune: (!args.no_prune).then_some((args.node_threshold, args.edge_threshold)),
        scan: args.scan,
        pass: args.pass.options(),
        logits: LogitChoice { cumulative: args.logit_probability, max: args.max_logits as usize },
        max_links: args.max_links as usize,
    };
    scae::util::io::refuse_overlap(&req.out, "--out", &scae::attrib::run::named_inputs(&req))?;
    let device = args.common.setup()?;
    let w = scae::attrib::run::run(&req, &device)?;
    let g = &w.graph;
    let features = g.nodes.iter().filter(|n| matches!(n.kind, scae::attrib::NodeKind::Feature { .. })).count();
    scae::say!(
        "attribute: {} tokens, {features} active features, {} links; written {} nodes and {} links{}; top logit {} -> {}",
        g.tokens.len(),
        g.links.len(),
        w.nodes,
        w.links,
        if req.prune.is_some() { " (pruned as circuit-tracer: --no-prune for all)" } else { "" },
        w.top_logit,
        w.path.display()
    )?;
    Ok(())
}
