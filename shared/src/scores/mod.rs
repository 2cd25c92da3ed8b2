//! Edge scores: the average signed contribution of every upstream feature to every downstream
//! feature's pre-activation, under the suite's full pass (all connections); top-C selection in
//! [`select`], the score-edges runner in [`run`].
//!
//! Definition (scae; the reference's up to a positive factor per downstream module; docs/MATH.md, "Edge scores and top-C selection"): for a downstream
//! feature `i` of module d (layer L) and an upstream feature `g` of a module u that precedes d,
//! `score(g -> i)` is the mean over all cached tokens of g's term in i's pre-activation:
//! - mlp d: `V[i,g] · mean_t f_u[t,g] / s2_L[t]` with `V = E_d W_dec^u` (the reference sums
//!   over tokens instead: its value is ours × tokens-per-batch);
//! - attn d: `Σ_h V_h[i,g] · mean_{b,q} Σ_p P[b,h,q,p] f_u[b,p,g] / s1_L[b,p]` with
//!   `V_h = E_d W_OV[h]ᵀ W_dec^u` (the reference divides by B·H·S² instead of B·S: its value is
//!   ours / (H·S)).
//!
//! Only the token statistics depend on the data, so one pass over the cache accumulates them
//! (`F` numbers per (layer, up module), `H·F` for attention) and the `F×F` scores are formed one
//! module pair at a time afterwards, so memory stays bounded.
//!
//! Selection order (documented tie rule): by |score| descending, then upstream module in suite
//! order, then upstream feature index ascending. Exact zeros are never selected.

mod run;
mod select;

pub use run::{run, ScoreConfig, Scored};
pub use select::{edge_order, randomize_like, select, select_top_c, select_unembed, SelectConfig, Selected};

use candle_core::{DType, Device, Tensor};

use crate::data::Batch;
use crate::error::Result;
use crate::formats::connections::{Edge, EMBED_UP};
use crate::formats::suite::Suite;
use crate::model::Kind;
use crate::model::Runtime;
use crate::pass::PassOutput;
use crate::util::collective::Collective;

/// Token statistics for edge scores, accumulated batch by batch.
#[derive(Debug, Clone)]
pub struct ScoreStats {
    pub n_tokens: u64,
    n_features: usize,
    n_heads: usize,
    /// LNPre's epsilon (the unembed scores' scale of the spliced residual).
    ln_eps: f64,
    /// `[layer][up]`: Σ_t f_u[t,g]/s2_L[t]   (F values), for mlp downs.
    mlp: Vec<Vec<Option<Vec<f64>>>>,
    /// `[layer][up]`: Σ_{b,p} colsum_h[b,p] f_u[b,p,g]/s1_L[b,p]   (H·F values), for attn downs.
    attn: Vec<Vec<Option<Vec<f64>>>>,
    /// Embed edges scored too: per layer, the same statistics of the token indicators
    /// `[tok_t = v]` (V values for mlp downs, H·V for attn downs).
    embed: Option<EmbedStats>,
    /// Unembed edges scored too.
    unembed: Option<UnembedStats>,
    parallel: bool,
}

/// Token statistics of the unembed edges: per target token v, the positions `T_v` whose next
/// token is v, and `Σ_{t ∈ T_v} f_m[t, j] / s[t]` per co-occurring feature (memory: the
/// distinct (target, feature) pairs seen).
#[derive(Debug, Clone, Default)]
struct UnembedStats {
    count: std::collections::HashMap<u32, u64>,
    sums: std::collections::HashMap<(u32, u32), f64>,
}

impl UnembedStats {
    /// Every rank's maps added, key by key, in rank order: each rank sends its entries (sorted
    /// by key) to all.
    fn reduce(&mut self, coll: &dyn Collective) -> Result<()> {
        let mut count: std::collections::HashMap<u32, u64> = Default::default();
        let mut sums: std::collections::HashMap<(u32, u32), f64> = Default::default();
        for root in 0..coll.size() {
            let mut bytes = Vec::new();
            if root == coll.rank() {
                let mut c: Vec<_> = self.count.iter().collect();
                c.sort();
                let mut e: Vec<_> = self.sums.iter().collect();
                e.sort_by_key(|(k, _)| **k);
                bytes.extend((c.len() as u64).to_le_bytes());
                for (k, v) in c {
                    bytes.extend(k.to_le_bytes());
                    bytes.extend(v.to_le_bytes());
                }
                for ((v, j), x) in e {
                    bytes.extend(v.to_le_bytes());
                    bytes.extend(j.to_le_bytes());
                    bytes.extend(x.to_le_bytes());
                }
            }
            coll.broadcast_from(root, &mut bytes)?;
            let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            let mut at = 8;
            for _ in 0..u64_at(0) {
                *count.entry(u32_at(at)).or_default() += u64_at(at + 4);
                at += 12;
            }
            while at < bytes.len() {
                *sums.entry((u32_at(at), u32_at(at + 4))).or_default() += f64::from_bits(u64_at(at + 8));
                at += 16;
            }
        }
        (self.count, self.sums) = (count, sums);
        Ok(())
    }
}

/// Token statistics of the embed edges (docs/MATH.md, "Embed and unembed connections").
#[derive(Debug, Clone)]
struct EmbedStats {
    vocab: usize,
    /// `[layer]`: Σ_{t : tok_t = v} 1/s2_L[t].
    mlp: Vec<Vec<f64>>,
    /// `[layer]`: Σ_{b,p : tok = v} colsum_h[b,p]/s1_L[b,p], laid out `[h][v]`.
    attn: Vec<Vec<f64>>,
}

impl ScoreStats {
    /// Empty statistics for `suite` on a model with `n_heads` heads.
    pub fn new(suite: &Suite, n_heads: usize, parallel: bool) -> ScoreStats {
        let n_layers = suite.modules.len() / 2;
        let m = suite.modules.len();
        ScoreStats {
            n_tokens: 0,
            n_features: suite.n_features,
            n_heads,
            ln_eps: 0.0,
            mlp: vec![vec![None; m]; n_layers],
            attn: vec![vec![None; m]; n_layers],
            embed: None,
            unembed: None,
            parallel,
        }
    }

    /// Also score edges into the unembedding (docs/MATH.md, "Embed and unembed connections"):
    /// feature j of module m -> output token v by j's mean contribution to logit v over the
    /// positions whose next token is v (`ln_eps`: the model's LayerNorm epsilon).
    pub fn with_unembed(mut self, ln_eps: f64) -> ScoreStats {
        self.unembed = Some(UnembedStats::default());
        self.ln_eps = ln_eps;
        self
    }

    /// Also score edges from the token embedding (a model with `vocab` tokens); they are
    /// pooled with the modules' edges in [`top_edges`](Self::top_edges).
    pub fn with_embed(mut self, vocab: usize) -> ScoreStats {
        let n_layers = self.mlp.len();
        self.embed = Some(EmbedStats {
            vocab,
            mlp: vec![vec![0.0; vocab]; n_layers],
            attn: vec![vec![0.0; self.n_heads * vocab]; n_layers],
        });
        self
    }

    /// Add one batch, given the features of the full pass on it.
    pub fn accumulate(&mut self, suite: &Suite, batch: &Batch, out: &PassOutput) -> Result<()> {
        let (b, s, _) = batch.resid_pre0.dims3()?;
        let n = b * s;
        let (f, h) = (self.n_features, self.n_heads);
        self.n_tokens += n as u64;
        if let Some(us) = &mut self.unembed {
            let host = |t: &Tensor| -> Result<Vec<f32>> { crate::util::to_vec(&t.to_dtype(DType::F32)?) };
            let toks = host(&batch.tokens)?;
            // LNPre's scale of the spliced residual of this (full) pass.
            let resid = crate::pass::objective::spliced_resid(batch, out)?;
            let centred = resid.broadcast_sub(&resid.mean_keepdim(2)?)?;
            let scale = host(&(centred.sqr()?.mean_keepdim(2)? + self.ln_eps)?.sqrt()?)?;
            let feats: Vec<Vec<f32>> = out.feats.iter().map(|x| host(x)).collect::<Result<_>>()?;
            for t in 0..n {
                if t % s == s - 1 {
                    continue; // no next token
                }
                let v = toks[t + 1] as u32;
                *us.count.entry(v).or_default() += 1;
                for (m, fm) in feats.iter().enumerate() {
                    for (j, &x) in fm[t * f..(t + 1) * f].iter().enumerate() {
                        if x != 0.0 {
                            *us.sums.entry((v, (m * f + j) as u32)).or_default() += (x / scale[t]) as f64;
                        }
                    }
                }
            }
        }
        if let Some(es) = &mut self.embed {
            let host = |t: &Tensor| -> Result<Vec<f32>> { crate::util::to_vec(&t.to_dtype(DType::F32)?) };
            let toks = host(&batch.tokens)?;
            for l in 0..es.mlp.len() {
                let (s2, s1) = (host(&batch.ln2_scale[l])?, host(&batch.ln1_scale[l])?);
                let colsum = host(&batch.pattern[l].sum(2)?)?; // (B, H, S)
                for t in 0..n {
                    let v = toks[t] as usize;
                    es.mlp[l][v] += 1.0 / s2[t] as f64;
                    let (bi, p) = (t / s, t % s);
                    for hh in 0..h {
                        es.attn[l][hh * es.vocab + v] += (colsum[(bi * h + hh) * s + p] / s1[t]) as f64;
                    }
                }
            }
        }
        for d in &suite.modules {
            let l = d.layer;
            for (u, um) in suite.modules.iter().enumerate() {
                if !um.precedes(d, self.parallel) {
                    continue;
                }
                let feats = &out.feats[u]; // (N, F)
                match d.kind {
                    Kind::Mlp => {
                        let w = batch.ln2_scale[l].reshape((1, n))?.recip()?;
                        let sum = w.matmul(&feats.detach())?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                        add_into(&mut self.mlp[l][u], &sum, f);
                    }
                    Kind::Attn => {
                        // colsum[b,h,p] = Σ_q P[b,h,q,p]; weight[h, (b,p)] = colsum / s1[b,p]
                        let colsum = batch.pattern[l].sum(2)?; // (B, H, S)
                        let w = colsum.broadcast_div(&batch.ln1_scale[l].reshape((b, 1, s))?)?;
                        let w = w.transpose(0, 1)?.reshape((h, n))?.contiguous()?;
                        let sum = w.matmul(&feats.detach())?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                        add_into(&mut self.attn[l][u], &sum, h * f);
                    }
                }
            }
        }
        Ok(())
    }

    /// Add the statistics of every rank of `coll` (each accumulated over its share of the
    /// batches), in rank order, so that every rank holds the statistics of all batches.
    pub fn reduce(&mut self, suite: &Suite, coll: &dyn Collective) -> Result<()> {
        if coll.size() == 1 {
            return Ok(());
        }
        let (f, h) = (self.n_features, self.n_heads);
        let mut n = [self.n_tokens as f64];
        coll.sum_f64(&mut n)?;
        self.n_tokens = n[0] as u64;
        for d in &suite.modules {
            for (u, um) in suite.modules.iter().enumerate() {
                if !um.precedes(d, self.parallel) {
                    continue;
                }
                let (slot, len) = match d.kind {
                    Kind::Mlp => (&mut self.mlp[d.layer][u], f),
                    Kind::Attn => (&mut self.attn[d.layer][u], h * f),
                };
                coll.sum_f64(slot.get_or_insert_with(|| vec![0.0; len]))?;
            }
        }
        if let Some(es) = &mut self.embed {
            for v in es.mlp.iter_mut().chain(es.attn.iter_mut()) {
                coll.sum_f64(v)?;
            }
        }
        if let Some(us) = &mut self.unembed {
            us.reduce(coll)?;
        }
        Ok(())
    }

    /// The `F_down × F_up` score matrix of the pair (d, u) (module indices), on the CPU.
    pub fn pair_scores(&self, suite: &Suite, rt: &Runtime, d: usize, u: usize) -> Result<Tensor> {
        self.pair_factors(suite, rt, d, u)?.rows(0, self.n_features)
    }

    /// The pair's scores as a product of factors computed once, so that its rows can be formed
    /// a block at a time (memory: a block of rows, not `F × F`).
    fn pair_factors(&self, suite: &Suite, rt: &Runtime, d: usize, u: usize) -> Result<PairFactors> {
        let dm = &suite.modules[d];
        let (f, h, dh) = (self.n_features, self.n_heads, rt.cfg.d_head);
        let dev = Device::Cpu;
        let enc = suite.aes[d].w_enc.as_tensor().to_device(&dev)?;
        let dec = suite.aes[u].w_dec.as_tensor().to_device(&dev)?;
        let norm = 1.0 / self.n_tokens.max(1) as f64;
        let stat = |v: &Option<Vec<f64>>, len: usize| -> Result<Tensor> {
            let vals: Vec<f32> = match v {
                Some(v) => v.iter().map(|x| (x * norm) as f32).collect(),
                None => vec![0.0; len],
            };
            Ok(Tensor::from_vec(vals, len, &dev)?)
        };
        Ok(match dm.kind {
            // V[i, g] · m[g] with V = E W_dec.
            Kind::Mlp => {
                PairFactors { left: enc, right: dec, scale: Some(stat(&self.mlp[dm.layer][u], f)?.unsqueeze(0)?) }
            }
            Kind::Attn => {
                // Σ_h (E W_O[h]ᵀ)(W_dec[:,g]ᵀ W_V[h])·z_h[g] as one (F, H·dh) x (H·dh, F) product.
                let z = stat(&self.attn[dm.layer][u], h * f)?.reshape((h, f))?;
                let (w_v, w_o) = rt.flat_vo(dm.layer);
                let (w_v, w_o) = (w_v.to_device(&dev)?, w_o.to_device(&dev)?);
                let ev = enc.matmul(&w_o.t()?)?; // (F_down, H·dh)
                let dv = dec.t()?.matmul(&w_v)?.reshape((f, h, dh))?; // (F_up, H, dh)
                let dvz = dv.broadcast_mul(&z.t()?.unsqueeze(2)?)?.reshape((f, h * dh))?;
                PairFactors { left: ev, right: dvz.t()?, scale: None }
            }
        })
    }

    /// For every feature of down module `d`, its `keep` highest-|score| edges across all
    /// preceding modules, in selection order (see the module docs). Exact zeros are skipped.
    pub fn top_edges(&self, suite: &Suite, rt: &Runtime, d: usize, keep: usize) -> Result<Vec<Vec<Edge>>> {
        let f = self.n_features;
        let mut best: Vec<Vec<Edge>> = vec![Vec::new(); f];
        // One row's candidates at a time, so each feature keeps at most `keep` edges (memory
        // F·keep, not F·F, whatever the number of features).
        let mut scratch: Vec<Edge> = Vec::new();
        for u in 0..suite.modules.len() {
            if !suite.modules[u].precedes(&suite.modules[d], self.parallel) {
                continue;
            }
            let factors = self.pair_factors(suite, rt, d, u)?;
            for start in (0..f).step_by(SCORE_ROWS) {
                let len = SCORE_ROWS.min(f - start);
                let scores = factors.rows(start, len)?.flatten_all()?.to_vec1::<f32>()?;
                for (r, cand) in best[start..start + len].iter_mut().enumerate() {
                    let row = &scores[r * f..(r + 1) * f];
                    scratch.clear();
                    scratch.extend_from_slice(cand);
                    scratch.extend(row.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(g, &v)| Edge {
                        up: u,
                        feature: g as u32,
                        score: v,
                    }));
                    if scratch.len() > keep {
                        scratch.select_nth_unstable_by(keep, edge_order);
                        scratch.truncate(keep);
                    }
                    cand.clear();
                    cand.extend_from_slice(&scratch);
                }
            }
        }
        if let Some(es) = &self.embed {
            let factors = self.embed_factors(suite, rt, es, d)?;
            let (tokens, factors) = match factors {
                Some(x) => x,
                None => return Ok(sorted(best)),
            };
            for start in (0..f).step_by(SCORE_ROWS) {
                let len = SCORE_ROWS.min(f - start);
                let scores = factors.rows(start, len)?.flatten_all()?.to_vec1::<f32>()?;
                let m = tokens.len();
                for (r, cand) in best[start..start + len].iter_mut().enumerate() {
                    let row = &scores[r * m..(r + 1) * m];
                    cand.extend(row.iter().zip(&tokens).filter(|(v, _)| **v != 0.0).map(|(&v, &token)| Edge {
                        up: EMBED_UP,
                        feature: token,
                        score: v,
                    }));
                    if cand.len() > keep {
                        cand.select_nth_unstable_by(keep, edge_order);
                        cand.truncate(keep);
                    }
                }
            }
        }
        Ok(sorted(best))
    }

    /// The embed edges' score factors for down module `d`, over the tokens seen (nonzero
    /// statistic) by its layer: `(tokens, factors)`, `None` when no token was seen.
    fn embed_factors(
        &self,
        suite: &Suite,
        rt: &Runtime,
        es: &EmbedStats,
        d: usize,
    ) -> Result<Option<(Vec<u32>, PairFactors)>> {
        let dm = &suite.modules[d];
        let (l, h, dh, v) = (dm.layer, self.n_heads, rt.cfg.d_head, es.vocab);
        let norm = 1.0 / self.n_tokens.max(1) as f64;
        let dev = Device::Cpu;
        let seen: Vec<u32> = match dm.kind {
            Kind::Mlp => (0..v as u32).filter(|&t| es.mlp[l][t as usize] != 0.0).collect(),
            Kind::Attn => (0..v as u32).filter(|&t| (0..h).any(|hh| es.attn[l][hh * v + t as usize] != 0.0)).collect(),
        };
        if seen.is_empty() {
            return Ok(None);
        }
        let m = seen.len();
        let enc = suite.aes[d].w_enc.as_tensor().to_device(&dev)?;
        let ids = Tensor::from_vec(seen.clone(), m, &dev)?;
        let w_e = rt.weights.w_e.to_device(&dev)?.index_select(&ids, 0)?; // (m, D)
        Ok(Some((
            seen.clone(),
            match dm.kind {
                Kind::Mlp => {
                    let z: Vec<f32> = seen.iter().map(|&t| (es.mlp[l][t as usize] * norm) as f32).collect();
                    let scale = Tensor::from_vec(z, (1, m), &dev)?;
                    PairFactors { left: enc, right: w_e.t()?.contiguous()?, scale: Some(scale) }
                }
                Kind::Attn => {
                    let z: Vec<f32> = (0..m)
                        .flat_map(|c| (0..h).map(move |hh| (hh, c)))
                        .map(|(hh, c)| (es.attn[l][hh * v + seen[c] as usize] * norm) as f32)
                        .collect();
                    let z = Tensor::from_vec(z, (m, h, 1), &dev)?;
                    let (w_v, w_o) = rt.flat_vo(l);
                    let (w_v, w_o) = (w_v.to_device(&dev)?, w_o.to_device(&dev)?);
                    let ev = enc.matmul(&w_o.t()?)?; // (F_down, H·dh)
                    let dv = w_e.matmul(&w_v)?.reshape((m, h, dh))?.broadcast_mul(&z)?.reshape((m, h * dh))?;
                    PairFactors { left: ev, right: dv.t()?.contiguous()?, scale: None }
                }
            },
        )))
    }
}

impl ScoreStats {
    /// For every output token seen as a target, its `keep` highest-|score| features across
    /// all modules (`Edge::up` = module), in selection order; indexed by token id up to the
    /// largest seen. Empty without [`with_unembed`](Self::with_unembed).
    pub fn top_unembed_edges(&self, suite: &Suite, rt: &Runtime, keep: usize) -> Result<Vec<Vec<Edge>>> {
        let Some(us) = &self.unembed else { return Ok(Vec::new()) };
        let (f, d) = (self.n_features, suite.d_model);
        let n_vocab = us.count.keys().max().map_or(0, |&v| v as usize + 1);
        let mut best: Vec<Vec<Edge>> = vec![Vec::new(); n_vocab];
        let w_ut = crate::util::to_vec(&rt.weights.w_u.t()?.contiguous()?)?; // (V, D)
        let decs: Vec<Vec<f32>> = suite
            .aes
            .iter()
            .map(|ae| crate::util::to_vec(&ae.w_dec.as_tensor().t()?.contiguous()?))
            .collect::<Result<_>>()?; // (F, D) per module
        for (&(v, col), &sum) in &us.sums {
            let (m, j) = (col as usize / f, col as usize % f);
            let u = crate::util::blas::dot(&decs[m][j * d..(j + 1) * d], &w_ut[v as usize * d..(v as usize + 1) * d]);
            let score = (sum / us.count[&v] as f64) as f32 * u;
            if score != 0.0 {
                best[v as usize].push(Edge { up: m, feature: j as u32, score });
            }
        }
        for cand in best.iter_mut() {
            cand.sort_by(edge_order);
            cand.truncate(keep);
        }
        Ok(best)
    }
}

/// Each feature's candidates in selection order.
fn sorted(mut best: Vec<Vec<Edge>>) -> Vec<Vec<Edge>> {
    for cand in &mut best {
        cand.sort_by(edge_order);
    }
    best
}

/// Downstream rows of a pair's scores formed at a time in [`ScoreStats::top_edges`].
const SCORE_ROWS: usize = 1024;

/// `scores = (left · right) ⊙ scale` for a pair of modules: `left (F_down, K)`,
/// `right (K, F_up)`, `scale (1, F_up)` (mlp targets).
struct PairFactors {
    left: Tensor,
    right: Tensor,
    scale: Option<Tensor>,
}

impl PairFactors {
    /// Downstream rows `start..start + len` of the scores, `(len, F_up)`.
    fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let block = self.left.narrow(0, start, len)?.matmul(&self.right)?;
        Ok(match &self.scale {
            Some(m) => block.broadcast_mul(m)?,
            None => block,
        })
    }
}

fn add_into(acc: &mut Option<Vec<f64>>, v: &[f64], len: usize) {
    let a = acc.get_or_insert_with(|| vec![0.0; len]);
    a.iter_mut().zip(v).for_each(|(x, y)| *x += y);
}
