//! Attribution graphs as circuit-tracer's and Neuronpedia's graph UI load them (schema version
//! 1; the fields are listed in shared/FORMATS.md, "Attribution graph"): `<dir>/<slug>.json`, and
//! `<dir>/graph-metadata.json`, the folder's list of graphs (`{"graphs": [metadata, …]}`, one
//! entry per slug, as circuit-tracer's `add_graph_metadata` keeps it).
//!
//! Each module has its own layer index (attn_L → 2L, mlp_L → 2L + 1) and the logits sit on
//! 2·n_layers + 1, as circuit-tracer puts them one past its last layer index + 1. Besides the
//! format's fields every node carries what makes it exact (`pre_activation`, `bias`,
//! `upstream_bias`, `position`, and `pruned_links`, the sum of its incoming links that pruning
//! left out), feature nodes their `module` and `index`.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::attrib::prune::Pruned;
use crate::attrib::{Graph, NodeKind};
use crate::error::{Error, Result};
use crate::model::Module;
use crate::model::{graph_feature, graph_layer};

/// Name of the folder's list of graphs.
pub const GRAPH_METADATA: &str = "graph-metadata.json";

/// The fields a graph file must have, as the format's producer (circuit-tracer's pydantic
/// models) declares them without defaults and its UI reads them.
pub const REQUIRED: Required = Required {
    top: &["metadata", "qParams", "nodes", "links"],
    metadata: &["slug", "scan", "transcoder_list", "prompt_tokens", "prompt"],
    q_params: &["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
    node: &["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"],
    link: &["source", "target", "weight"],
};

/// Required field names per object of a graph file.
pub struct Required {
    pub top: &'static [&'static str],
    pub metadata: &'static [&'static str],
    pub q_params: &'static [&'static str],
    pub node: &'static [&'static str],
    pub link: &'static [&'static str],
}

/// What the graph file says about its prompt and origin.
pub struct Meta<'a> {
    pub slug: &'a str,
    pub scan: &'a str,
    pub prompt: &'a str,
    /// Token texts as the UI shows them.
    pub prompt_tokens: Vec<String>,
    pub node_threshold: Option<f64>,
    /// What produced the graph (`metadata.info`).
    pub info: Value,
}

/// circuit-tracer's `process_token`: control characters as visible symbols.
pub fn process_token(t: &str) -> String {
    t.replace('\n', "⏎").replace('\t', "→").replace('\r', "↵")
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// The graph file: the nodes and links `pruned` keeps, where nodes without a kept link are left
/// out except tokens and logits, as circuit-tracer writes them; or, with `keep_all`, every
/// node and link.
pub fn to_json<'a>(
    graph: &'a Graph,
    pruned: &Pruned,
    keep_all: bool,
    modules: &[Module],
    token_text: &dyn Fn(u32) -> String,
    meta: &Meta,
) -> GraphFile<'a> {
    let n_graph_layers = 2 * modules.iter().map(|m| m.layer + 1).max().unwrap_or(0) as u64;
    let node_kept = |i: usize| keep_all || pruned.node_keep[i];
    let link_kept: Vec<bool> = graph
        .links
        .iter()
        .enumerate()
        .map(|(k, l)| (keep_all || pruned.link_keep[k]) && node_kept(l.source) && node_kept(l.target))
        .collect();
    let mut dropped = vec![0f64; graph.nodes.len()];
    let mut used = vec![false; graph.nodes.len()];
    for (l, &k) in graph.links.iter().zip(&link_kept) {
        if k {
            used[l.source] = true;
            used[l.target] = true;
        } else {
            dropped[l.target] += l.weight;
        }
    }
    let ids: Vec<String> = graph
        .nodes
        .iter()
        .map(|n| match n.kind {
            NodeKind::Token { token } => format!("E_{token}_{}", n.pos),
            NodeKind::Feature { module, feature } => format!("{}_{feature}_{}", graph_layer(&modules[module]), n.pos),
            NodeKind::Logit { token, .. } => format!("{}_{token}_{}", n_graph_layers + 1, n.pos),
        })
        .collect();
    let mut nodes = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let is_end = !matches!(n.kind, NodeKind::Feature { .. });
        if !keep_all && !(node_kept(i) && (used[i] || is_end)) {
            continue;
        }
        let mut o = Map::new();
        o.insert("node_id".into(), json!(ids[i]));
        let exact = [
            ("pre_activation", finite(n.pre)),
            ("bias", finite(n.terms.bias)),
            ("upstream_bias", finite(n.terms.upstream_bias)),
            ("position", finite(n.terms.position)),
            ("pruned_links", finite(dropped[i])),
        ];
        match n.kind {
            NodeKind::Token { token } => {
                o.insert("feature".into(), json!(n.pos));
                o.insert("layer".into(), json!("E"));
                o.insert("feature_type".into(), json!("embedding"));
                o.insert("jsNodeId".into(), json!(format!("E_{token}-{}", n.pos)));
                o.insert("clerp".into(), json!(""));
                o.insert("token_prob".into(), json!(0.0));
                o.insert("is_target_logit".into(), json!(false));
                o.insert("activation".into(), Value::Null);
            }
            NodeKind::Feature { module, feature } => {
                let layer = graph_layer(&modules[module]);
                o.insert("feature".into(), json!(graph_feature(layer, feature as u64)));
                o.insert("layer".into(), json!(layer.to_string()));
                o.insert("feature_type".into(), json!("cross layer transcoder"));
                o.insert("jsNodeId".into(), json!(format!("{layer}_{feature}-0")));
                o.insert("clerp".into(), json!(""));
                o.insert("token_prob".into(), json!(0.0));
                o.insert("is_target_logit".into(), json!(false));
                o.insert("activation".into(), finite(n.activation));
                o.insert("module".into(), json!(modules[module].name()));
                o.insert("index".into(), json!(feature));
                for (k, v) in exact {
                    o.insert(k.into(), v);
                }
            }
            NodeKind::Logit { token, prob } => {
                let first = i == graph.first_logit();
                let text = process_token(&token_text(token));
                o.insert("feature".into(), json!(token));
                o.insert("layer".into(), json!((n_graph_layers + 1).to_string()));
                o.insert("feature_type".into(), json!("logit"));
                o.insert("jsNodeId".into(), json!(format!("L_{token}-{}", n.pos)));
                o.insert("clerp".into(), json!(format!("Output \"{text}\" (p={prob:.3})")));
                o.insert("token_prob".into(), json!(prob));
                o.insert("is_target_logit".into(), json!(first));
                o.insert("activation".into(), Value::Null);
                for (k, v) in exact {
                    o.insert(if k == "pre_activation" { "logit".into() } else { k.into() }, v);
                }
            }
        }
        o.insert("ctx_idx".into(), json!(n.pos));
        o.insert("run_idx".into(), json!(0));
        o.insert("reverse_ctx_idx".into(), json!(0));
        o.insert("influence".into(), finite(pruned.cumulative[i]));
        nodes.push(Value::Object(o));
    }
    let n_links = link_kept.iter().filter(|&&k| k).count();
    let value = json!({
        "metadata": metadata(meta, modules),
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [],
    });
    GraphFile { value, graph, ids, link_kept, n_links }
}

/// A graph file: everything but the links as a JSON value (its `links` empty), and what the
/// links' text is written from when the file is (a graph can have millions of links: a Value
/// per link would take several hundred bytes, and even their text runs to gigabytes).
pub struct GraphFile<'a> {
    pub value: Value,
    graph: &'a Graph,
    ids: Vec<String>,
    link_kept: Vec<bool>,
    pub n_links: usize,
}

impl GraphFile<'_> {
    /// Write the file's text to `w`: the value's text with the kept links in place of its
    /// empty `links` array.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let head = self.value.to_string();
        // Only the top-level key has an empty array under `links` (metadata.info counts links
        // with a number) and quotes inside strings are escaped: the one `"links":[]` is that key.
        const EMPTY: &str = r#""links":[]"#;
        let at = head.find(EMPTY).ok_or_else(|| std::io::Error::other("internal: a graph value without its links"))?;
        w.write_all(&head.as_bytes()[..at])?;
        w.write_all(br#""links":["#)?;
        let kept = self.graph.links.iter().zip(&self.link_kept).filter(|x| *x.1);
        for (k, (l, _)) in kept.enumerate() {
            let comma = if k > 0 { "," } else { "" };
            write!(w, r#"{comma}{{"source":"{}","target":"{}","weight":"#, self.ids[l.source], self.ids[l.target])?;
            serde_json::to_writer(&mut *w, &finite(l.weight))?;
            w.write_all(b"}")?;
        }
        w.write_all(b"]")?;
        w.write_all(&head.as_bytes()[at + EMPTY.len()..])
    }
}

fn metadata(meta: &Meta, modules: &[Module]) -> Value {
    json!({
        "slug": meta.slug,
        "scan": meta.scan,
        "transcoder_list": modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "prompt_tokens": meta.prompt_tokens,
        "prompt": meta.prompt,
        "node_threshold": meta.node_threshold,
        "schema_version": 1,
        "info": meta.info,
    })
}

/// Write `<dir>/<slug>.json` and add (or replace) its entry in `<dir>/graph-metadata.json`,
/// each through a temporary file and a rename. An existing list that is not one is refused.
pub fn write(dir: &Path, slug: &str, graph: &GraphFile) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let list_path = dir.join(GRAPH_METADATA);
    let mut list = match std::fs::read_to_string(&list_path) {
        Ok(text) => serde_json::from_str::<Value>(&text).ok().filter(|v| v["graphs"].is_array()).ok_or_else(|| {
            Error::input(&list_path, "expected {\"graphs\": [...]} (a graph list), found something else")
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({"graphs": []}),
        Err(e) => return Err(Error::io(&list_path, e)),
    };
    let path = dir.join(format!("{slug}.json"));
    crate::util::io::write_via_tmp(&path, |tmp| {
        use crate::error::IoContext;
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp).at(tmp)?);
        graph.write_to(&mut w).and_then(|()| std::io::Write::flush(&mut w)).at(tmp)
    })?;
    let graphs = list["graphs"].as_array_mut().expect("checked above");
    graphs.retain(|g| g["slug"] != slug);
    graphs.push(graph.value["metadata"].clone());
    let text = serde_json::to_string_pretty(&list).map_err(|e| Error::input(&list_path, e.to_string()))?;
    crate::util::io::write_atomic(&list_path, text.as_bytes())?;
    Ok(path)
}

/// The first required field `value` lacks, as `object.field` (None: all present). Checks every
/// node and link.
pub fn missing_field(value: &Value) -> Option<String> {
    let r = &REQUIRED;
    let lacks = |o: &Value, fields: &[&str], what: &str| -> Option<String> {
        fields.iter().find(|f| o.get(**f).is_none()).map(|f| format!("{what}.{f}"))
    };
    lacks(value, r.top, "graph")
        .or_else(|| lacks(&value["metadata"], r.metadata, "metadata"))
        .or_else(|| lacks(&value["qParams"], r.q_params, "qParams"))
        .or_else(|| value["nodes"].as_array()?.iter().find_map(|n| lacks(n, r.node, "node")))
        .or_else(|| value["links"].as_array()?.iter().find_map(|l| lacks(l, r.link, "link")))
}
