//! The `attribute` stage: one sequence (a prompt, or a cached sequence) through a suite's
//! pruned pass, its exact graph, pruned or not, written as a graph file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use super::json::{self as graph_json, Meta};
use super::prune::{prune, Pruned};
use super::{attribute, Graph, LogitChoice, NodeKind, Setup};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::cache::CacheReader;
use crate::inputs::Inputs;
use crate::pass::{PassOptions, Plan, ValuePass, Wiring};

/// Which sequence to attribute.
pub enum Source {
    /// A text, tokenized by the model's tokenizer (BOS first when `bos`).
    Prompt { text: String, bos: bool },
    /// Sequence `seq` of an activation cache.
    Cache { acts: PathBuf, seq: usize },
}

/// One `attribute` run.
pub struct Request {
    pub suite: PathBuf,
    pub connections: Option<PathBuf>,
    pub model: Option<String>,
    pub source: Source,
    pub slug: Option<String>,
    pub out: PathBuf,
    /// Node and edge thresholds; `None` keeps the whole graph.
    pub prune: Option<(f64, f64)>,
    pub scan: Option<String>,
    pub pass: PassOptions,
    pub logits: LogitChoice,
    pub max_links: usize,
}

/// What was written.
pub struct Written {
    pub path: PathBuf,
    pub graph: Graph,
    pub pruned: Pruned,
    pub nodes: usize,
    pub links: usize,
    pub top_logit: String,
}

/// A slug as a file name: letters, digits, `-`, `_`, `.` (not leading).
fn check_slug(slug: &str) -> Result<()> {
    let ok = !slug.is_empty()
        && !slug.starts_with('.')
        && slug.len() <= 100
        && slug.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--slug `{slug}`: expected 1 to 100 letters, digits, `-`, `_` or `.` (not leading), as it names the file"
        )))
    }
}

/// A slug from a prompt: its first words, lower case, joined by `-`.
fn slug_of(text: &str) -> String {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.chars().filter(char::is_ascii_alphanumeric).collect::<String>().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    let mut slug = String::new();
    for w in words {
        if slug.len() + w.len() + 1 > 40 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&w);
    }
    if slug.is_empty() {
        "prompt".into()
    } else {
        slug
    }
}

/// Open the inputs and the one-sequence batch; returns them with the prompt text.
fn open(req: &Request, device: &Device) -> Result<(Inputs, Batch, String)> {
    match &req.source {
        Source::Cache { acts, seq } => {
            let inputs = Inputs::open(acts, &req.suite, req.model.as_deref(), device)?;
            let n = inputs.cache().manifest.n_seqs;
            if *seq >= n {
                return Err(Error::Usage(format!(
                    "--seq {seq}: {} holds sequences 0 to {} ({n} in all)",
                    acts.display(),
                    n.saturating_sub(1)
                )));
            }
            let batch = CacheReader::by_sequence(inputs.cache(), device).batch(&[*seq])?;
            let tokens: Vec<u32> = batch.tokens.flatten_all()?.to_vec1()?;
            let tok = inputs.model.tokenizer()?;
            let text: String = tokens.iter().map(|&t| tok.token_text(t)).collect();
            Ok((inputs, batch, text))
        }
        Source::Prompt { text, bos } => {
            let suite = crate::inputs::load_suite(&req.suite, device)?;
            let Some(model) = req.model.clone().or_else(|| suite.model_id.clone()) else {
                return Err(Error::Usage(format!(
                    "--prompt needs --model: {} does not record the model it belongs to",
                    req.suite.display()
                )));
            };
            let inputs = Inputs::with_model(suite, &model, &req.suite, device)?;
            let tok = inputs.model.tokenizer()?;
            let mut ids = tok.encode(text)?;
            if *bos {
                ids.insert(0, tok.bos);
            }
            let n_ctx = inputs.model.cfg().n_ctx;
            if ids.is_empty() || ids.len() > n_ctx {
                return Err(Error::Usage(format!(
                    "--prompt: expected 1 to {n_ctx} tokens (the model's context), found {}",
                    ids.len()
                )));
            }
            let tokens = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
            let fwd = inputs.model.runtime.forward(&tokens, true, false)?;
            let batch = Batch::from_forward(&tokens, &fwd)?;
            Ok((inputs, batch, text.clone()))
        }
    }
}

/// Run `req` on `device`.
pub fn run(req: &Request, device: &Device) -> Result<Written> {
    if let Some(s) = &req.slug {
        check_slug(s)?;
    }
    let (inputs, batch, text) = open(req, device)?;
    let chosen = inputs.choose_connections(req.connections.as_deref(), "attribute")?;
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let parallel = inputs.parallel();
    let wiring = match &chosen.set {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(suite, wiring, parallel, device)?;
    let out = ValuePass::new(suite, rt, &plan, req.pass, device)?.run(&batch)?;
    let products = super::Products::fresh();
    let conns = chosen.set.as_ref();
    let setup = Setup { suite, rt, conns, parallel, opts: req.pass, max_links: req.max_links, products: &products };
    let graph = attribute(&setup, &batch, &out, req.logits)?;
    let (node_t, edge_t) = req.prune.unwrap_or((1.0, 1.0));
    let pruned = prune(&graph, node_t, edge_t);
    let tok = inputs.model.tokenizer()?;
    let slug = match (&req.slug, &req.source) {
        (Some(s), _) => s.clone(),
        (None, Source::Prompt { text, .. }) => slug_of(text),
        (None, Source::Cache { seq, .. }) => format!("seq-{seq}"),
    };
    let suite_id = suite.id()?;
    let scan = req.scan.clone().unwrap_or_else(|| format!("scae-{}", crate::util::fingerprint::short(&suite_id)));
    let source = match &req.source {
        Source::Prompt { bos, .. } => json!({"prompt": text, "prepend_bos": bos}),
        Source::Cache { acts, seq } => json!({"acts": acts.display().to_string(), "seq": seq}),
    };
    let info = json!({
        "creator_name": "scae attribute",
        "generator": {"name": "scae", "version": env!("CARGO_PKG_VERSION")},
        "suite": req.suite.display().to_string(),
        "suite_id": suite_id,
        "model": inputs.model.id,
        "model_hash": inputs.model.hash,
        "pass": chosen.pass,
        "consistent_attn_bias": req.pass.consistent_attn_bias,
        "source": source,
        "layers": "each module has its own layer: attn_L -> 2L, mlp_L -> 2L+1; logits on 2*n_layers+1",
        "exact": "for every feature node: sum of incoming link weights + bias + upstream_bias + position + pruned_links = pre_activation (logit nodes: = logit)",
        "prune": req.prune.map(|(n, e)| json!({"node_threshold": n, "edge_threshold": e})),
        "logit_coverage": graph.logit_coverage,
        "before_pruning": {"nodes": graph.nodes.len(), "links": graph.links.len()},
    });
    let meta = Meta {
        slug: &slug,
        scan: &scan,
        prompt: &text,
        prompt_tokens: graph.tokens.iter().map(|&t| graph_json::process_token(&tok.token_text(t))).collect(),
        node_threshold: req.prune.map(|p| p.0),
        info,
    };
    let value =
        graph_json::to_json(&graph, &pruned, req.prune.is_none(), &suite.modules, &|t| tok.token_text(t), &meta);
    if let Some(field) = graph_json::missing_field(&value.value) {
        return Err(Error::Usage(format!("internal: the graph lacks the required field {field}")));
    }
    let nodes = value.value["nodes"].as_array().map_or(0, Vec::len);
    let links = value.n_links;
    let path = graph_json::write(&req.out, &slug, &value)?;
    let top_logit = graph
        .nodes
        .iter()
        .find_map(|n| match n.kind {
            NodeKind::Logit { token, prob } => Some(format!("\"{}\" (p={prob:.3})", tok.token_text(token))),
            _ => None,
        })
        .unwrap_or_default();
    Ok(Written { path, graph, pruned, nodes, links, top_logit })
}

/// The inputs a request names, for refusing an --out inside them.
pub fn named_inputs(req: &Request) -> Vec<(&'static str, Option<&Path>)> {
    let mut v = vec![("--suite", Some(req.suite.as_path())), ("--connections", req.connections.as_deref())];
    if let Source::Cache { acts, .. } = &req.source {
        v.push(("--acts", Some(acts.as_path())));
    }
    v
}
