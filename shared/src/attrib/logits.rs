//! The logit nodes of a graph's last position and their incoming links.

use candle_core::{DType, Tensor};

use super::{Active, LogitChoice, Node, NodeKind, NodeOf, Rows, Setup, Terms};
use crate::data::Batch;
use crate::error::Result;
use crate::pass::PassOutput;
use crate::util::to_vec;
use std::collections::HashMap;

pub(super) type LogitPart = (Vec<Node>, Vec<Vec<(usize, f64)>>, f64);

/// What the logits read besides features: the last position's token row `W_E[tok]` and
/// positional part `r0 − W_E[tok]`, and every module's `b_dec`.
pub(super) struct Ends<'a> {
    pub(super) token: &'a [f32],
    pub(super) position: &'a [f32],
    pub(super) b_dec: &'a [Vec<f32>],
}

/// The logit nodes of the last position and their incoming links (docs/MATH.md, "Embed and
/// unembed connections": with unembed edges a token reads only its connected features; the
/// scale is LNPre's of the whole spliced residual).
#[allow(clippy::too_many_arguments)]
pub(super) fn logit_part(
    setup: &Setup,
    batch: &Batch,
    out: &PassOutput,
    active: &[Active],
    node_of: &[NodeOf],
    nodes: &[Node],
    choice: LogitChoice,
    ends: &Ends,
) -> Result<LogitPart> {
    let rt = setup.rt;
    let cpu = candle_core::Device::Cpu;
    let (_, s, d) = batch.resid_pre0.dims3()?;
    let t = s - 1;
    let resid = to_vec(&crate::pass::objective::spliced_resid(batch, out)?.reshape((s, d))?.narrow(0, t, 1)?)?;
    let mean = resid.iter().map(|&x| x as f64).sum::<f64>() / d as f64;
    let var = resid.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / d as f64;
    let scale = (var + rt.cfg.ln_eps).sqrt();
    let w_u = rt.weights.w_u.to_device(&cpu)?.to_dtype(DType::F32)?;
    let vocab = w_u.dim(1)?;
    let b_u = to_vec(&rt.weights.b_u)?;
    let mut ub = vec![0f32; d];
    for b in ends.b_dec {
        ub.iter_mut().zip(b).for_each(|(a, &x)| *a += x);
    }
    let times_wu = |v: &[f32]| -> Result<Vec<f32>> { to_vec(&Tensor::new(v, &cpu)?.reshape((1, d))?.matmul(&w_u)?) };
    let (tok_l, pos_l, ub_l) = (times_wu(ends.token)?, times_wu(ends.position)?, times_wu(&ub)?);
    // Features active at the last position and their rows W_dec[:, j]ᵀ W_U.
    let unembed = setup.conns.map(|c| &c.unembed).filter(|u| !u.is_empty());
    let mut reads: Vec<(usize, usize, f64, Vec<f32>)> = Vec::new(); // (module, node, value, row over V)
    let mut readers: HashMap<(usize, u32), usize> = HashMap::new();
    for (m, a) in active.iter().enumerate() {
        let here: Vec<usize> = (0..a.ids.len()).filter(|&r| node_of[m].contains_key(&(t, a.ids[r]))).collect();
        if here.is_empty() {
            continue;
        }
        let rows = Rows::of(&a.dec.tensor(here.iter().copied())?.matmul(&w_u)?)?;
        for (k, &r) in here.iter().enumerate() {
            let j = a.ids[r];
            readers.insert((m, j), reads.len());
            let node = node_of[m][&(t, j)];
            reads.push((m, node, nodes[node].activation, rows.row(k).to_vec()));
        }
    }
    // Which features token v reads.
    let reads_of = |v: usize| -> Vec<usize> {
        match unembed {
            Some(u) => u
                .get(v)
                .map_or(Vec::new(), |es| es.iter().filter_map(|e| readers.get(&(e.up, e.feature)).copied()).collect()),
            None => (0..reads.len()).collect(),
        }
    };
    let logit = |v: usize| -> f64 {
        let feats: f64 = reads_of(v).iter().map(|&k| reads[k].2 * reads[k].3[v] as f64).sum();
        (tok_l[v] as f64 + pos_l[v] as f64 + ub_l[v] as f64 + feats) / scale + b_u[v] as f64
    };
    let all: Vec<f64> = (0..vocab).map(logit).collect();
    let max = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = all.iter().map(|&x| (x - max).exp()).sum();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| all[b].total_cmp(&all[a]).then(a.cmp(&b)));
    let (mut nodes, mut links, mut covered) = (Vec::new(), Vec::new(), 0.0);
    for &v in order.iter().take(choice.max.max(1)) {
        let prob = (all[v] - max).exp() / z;
        let mut incoming = vec![(t, tok_l[v] as f64 / scale)];
        incoming.extend(reads_of(v).into_iter().map(|k| (reads[k].1, reads[k].2 * reads[k].3[v] as f64 / scale)));
        let terms =
            Terms { bias: b_u[v] as f64, upstream_bias: ub_l[v] as f64 / scale, position: pos_l[v] as f64 / scale };
        nodes.push(Node {
            kind: NodeKind::Logit { token: v as u32, prob },
            pos: t,
            activation: all[v],
            pre: all[v],
            terms,
        });
        links.push(incoming);
        covered += prob;
        if covered >= choice.cumulative {
            break;
        }
    }
    Ok((nodes, links, covered))
}
