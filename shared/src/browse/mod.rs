//! The feature browser (`view-features`). [`collect`] makes one streaming pass over a cache
//! through the pass the suite is evaluated with, keeping per feature its firing count, sum and
//! max, the top-N activating contexts (with left and right context), a reservoir of activations
//! (for the histogram) and a small reservoir of contexts (for examples from lower quantiles);
//! then the logit lens of each decoder direction. [`page`] turns these into the page's data
//! files; [`run`] does both into an output folder.

pub mod graphs;
pub mod neuronpedia;
pub mod page;
pub mod why;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::inputs::Inputs;
use crate::pass::{PassOptions, Plan, ValuePass, Wiring};
use crate::sae::topk::order_key;
use crate::util::collective::Collective;
use crate::util::io::StagedDir;
use crate::util::rng::SplitMix;

/// What to keep per feature.
#[derive(Debug, Clone)]
pub struct BrowseConfig {
    pub batch_size: usize,
    pub limit: Option<usize>,
    /// Top activating contexts kept per feature.
    pub top_n: usize,
    /// Tokens of context left and right of the activating token.
    pub left: usize,
    pub right: usize,
    /// Activations sampled per feature for the histogram.
    pub hist_samples: usize,
    /// Contexts sampled per feature for the lower-quantile examples.
    pub sample_contexts: usize,
    /// Tokens in each logit-lens list.
    pub lens: usize,
    pub pass: PassOptions,
    pub seed: u64,
    /// At most this many feature values (8 bytes each) kept in [`Browse::kept`].
    pub keep_entries: usize,
}

/// One activating context: the window's tokens and this feature's activations on them.
#[derive(Debug, Clone)]
pub struct Context {
    pub act: f32,
    pub seq: u32,
    pub pos: u32,
    /// Index of the activating token in `tokens`.
    pub at: u32,
    pub tokens: Vec<u32>,
    pub acts: Vec<f32>,
}

/// Everything kept for one feature.
#[derive(Debug, Clone, Default)]
pub struct FeatureStats {
    pub count: u64,
    pub sum: f64,
    pub max: f32,
    /// Highest activations first (after [`finish`](Browse::finish)).
    pub top: Vec<Context>,
    /// Reservoir of activation values.
    pub samples: Vec<f32>,
    /// Reservoir of contexts (sorted by activation after `finish`).
    pub sampled: Vec<Context>,
}

/// Logit lens of a decoder direction: the tokens it promotes and suppresses most.
#[derive(Debug, Clone, Default)]
pub struct Lens {
    pub top: Vec<(u32, f32)>,
    pub bottom: Vec<(u32, f32)>,
}

/// The statistics of every feature of every module.
pub struct Browse {
    pub n_tokens: u64,
    pub n_seqs: usize,
    pub stats: Vec<Vec<FeatureStats>>,
    /// Per module and feature (empty until [`run`] forms them after the statistics).
    pub lens: Vec<Vec<Lens>>,
    /// The pass's features of the sequences holding top contexts (per module, the nonzero
    /// `(pos·F + feature, value)`), for the why-it-fired pass; a sequence left out (beyond
    /// [`BrowseConfig::keep_entries`]) is run again there.
    pub kept: HashMap<usize, Vec<Vec<(u32, f32)>>>,
}

/// Insert into a top-N list kept unsorted (the minimum is replaced); `make` builds the context
/// only when `act` enters the list.
/// Returns whether `act` entered, and the sequence of the context it replaced.
fn push_top(top: &mut Vec<Context>, n: usize, act: f32, make: impl FnOnce() -> Context) -> (bool, Option<u32>) {
    if top.len() < n {
        top.push(make());
        return (true, None);
    }
    let (mi, mv) =
        top.iter().enumerate().fold((0, f32::INFINITY), |m, (i, x)| if x.act < m.1 { (i, x.act) } else { m });
    if act > mv {
        let out = std::mem::replace(&mut top[mi], make());
        return (true, Some(out.seq));
    }
    (false, None)
}

/// This batch's features `(b·s, F)` per module on the host, for rank 0: computed here, or on a
/// job of several ranks by the batch's owner and sent to rank 0 (the values whose bits are not
/// zero, with their places), so that rank 0 keeps the statistics of exactly the values one
/// process would. The owner gets its own features back; other ranks get none.
fn batch_features(
    coll: &dyn Collective,
    owner: usize,
    compute: impl FnOnce() -> Result<Vec<Vec<f32>>>,
    len: usize,
) -> Result<Vec<Vec<f32>>> {
    if coll.rank() == owner && owner == 0 {
        return compute();
    }
    let mut bytes = Vec::new();
    if coll.rank() == owner {
        for v in compute()? {
            let nz: Vec<(u32, f32)> =
                v.iter().enumerate().filter(|(_, a)| a.to_bits() != 0).map(|(i, a)| (i as u32, *a)).collect();
            bytes.extend((nz.len() as u64).to_le_bytes());
            for (i, a) in nz {
                bytes.extend(i.to_le_bytes());
                bytes.extend(a.to_le_bytes());
            }
        }
    }
    coll.send_to_root(owner, &mut bytes)?;
    if coll.rank() != 0 {
        return Ok(Vec::new());
    }
    let word = |at: usize| -> [u8; 4] { bytes[at..at + 4].try_into().expect("4 bytes") };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        at += 8;
        let mut v = vec![0f32; len];
        for _ in 0..n {
            v[u32::from_le_bytes(word(at)) as usize] = f32::from_le_bytes(word(at + 4));
            at += 8;
        }
        out.push(v);
    }
    Ok(out)
}

/// `f(i, v[i])` for each value of `v` whose bits are not all zero, in order (runs of +0, most
/// of a top-k feature row, are skipped 16 at a time).
fn each_set(v: &[f32], mut f: impl FnMut(usize, f32)) {
    let mut chunks = v.chunks_exact(16);
    let mut at = 0;
    for c in &mut chunks {
        if c.iter().fold(0u32, |a, x| a | x.to_bits()) != 0 {
            c.iter().enumerate().filter(|(_, x)| x.to_bits() != 0).for_each(|(k, &x)| f(at + k, x));
        }
        at += 16;
    }
    chunks.remainder().iter().enumerate().filter(|(_, x)| x.to_bits() != 0).for_each(|(k, &x)| f(at + k, x));
}

/// Run `pass` (the suite's value pass with the browser's connections) over `inputs`' cache and
/// collect every feature's statistics (the logit lens is [`run`]'s, after).
///
/// On several ranks of `coll` the pass is shared (batch i on rank i mod N) and rank 0 keeps
/// the statistics from every batch's features in cache order, so its result is the one
/// process's, bit for bit; the other ranks return empty statistics.
fn collect(
    inputs: &Inputs,
    pass: &ValuePass,
    cfg: &BrowseConfig,
    device: &Device,
    coll: &dyn Collective,
) -> Result<Browse> {
    let suite = &inputs.suite;
    let (f, n_mod) = (suite.n_features, suite.modules.len());
    let cache = inputs.cache();
    let m = &cache.manifest;
    let total = cfg.limit.unwrap_or(m.n_seqs).min(m.n_seqs);
    let mut bar = crate::util::token_bar(Some((total * m.ctx_len) as u64), "view-features");
    let mut stats = vec![vec![FeatureStats::default(); f]; n_mod];
    let mut rng = SplitMix(cfg.seed ^ 0x5ca3_b20e);
    let (mut n_tokens, mut seq0, mut index) = (0u64, 0usize, 0usize);
    let (mut kept, mut kept_entries) = (HashMap::new(), 0usize);
    // How many top contexts each sequence holds (over all features).
    let mut holding: HashMap<usize, u32> = HashMap::new();
    // Rank 0 reads every batch (it keeps the statistics); another rank only the ones it owns.
    let (rank, ranks) = (coll.rank(), coll.size());
    let mine = |i: usize| rank == 0 || i % ranks == rank;
    let n_seqs = cache.for_each_batch_of(cfg.batch_size, cfg.limit, device, mine, |batch| {
        let (b, s) = batch.tokens.dims2()?;
        let compute = || -> Result<Vec<Vec<f32>>> {
            let out = pass.run(&batch)?;
            out.feats.iter().map(|t| Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)).collect()
        };
        let owner = if rank == 0 { index % ranks } else { rank };
        let feats = batch_features(coll, owner, compute, b * s * f)?;
        index += 1;
        if rank != 0 {
            return Ok(());
        }
        let tokens: Vec<u32> = batch.tokens.flatten_all()?.to_vec1()?;
        for bi in 0..b {
            // Once the budget is full, nothing more is kept until sequences leave it.
            if kept_entries >= cfg.keep_entries {
                break;
            }
            let sparse: Vec<Vec<(u32, f32)>> = feats
                .iter()
                .map(|v| {
                    let mut nz = Vec::new();
                    each_set(&v[bi * s * f..(bi + 1) * s * f], |c, a| {
                        if a != 0.0 {
                            nz.push((c as u32, a))
                        }
                    });
                    nz
                })
                .collect();
            let n: usize = sparse.iter().map(Vec::len).sum();
            if kept_entries + n <= cfg.keep_entries {
                kept_entries += n;
                kept.insert(seq0 + bi, sparse);
            }
        }
        for (mi, v) in feats.into_iter().enumerate() {
            let st = &mut stats[mi];
            for row in 0..b * s {
                let (bi, pos) = (row / s, row % s);
                each_set(&v[row * f..(row + 1) * f], |j, a| {
                    if a <= 0.0 {
                        return;
                    }
                    let fs = &mut st[j];
                    fs.count += 1;
                    fs.sum += a as f64;
                    fs.max = fs.max.max(a);
                    let window = |act: f32| {
                        let (lo, hi) = (pos.saturating_sub(cfg.left), (pos + cfg.right + 1).min(s));
                        Context {
                            act,
                            seq: (seq0 + bi) as u32,
                            pos: pos as u32,
                            at: (pos - lo) as u32,
                            tokens: tokens[bi * s + lo..bi * s + hi].to_vec(),
                            acts: (lo..hi).map(|q| v[(bi * s + q) * f + j]).collect(),
                        }
                    };
                    let (entered, replaced) = push_top(&mut fs.top, cfg.top_n, a, || window(a));
                    if entered {
                        *holding.entry(seq0 + bi).or_insert(0) += 1;
                    }
                    if let Some(r) = replaced {
                        let c = holding.get_mut(&(r as usize)).expect("a held sequence is counted");
                        *c -= 1;
                        if *c == 0 {
                            holding.remove(&(r as usize));
                        }
                    }
                    // Reservoir sampling (Algorithm R) of values and of contexts.
                    let seen = fs.count;
                    if fs.samples.len() < cfg.hist_samples {
                        fs.samples.push(a);
                    } else {
                        let r = (rng.next_u64() % seen) as usize;
                        if r < cfg.hist_samples {
                            fs.samples[r] = a;
                        }
                    }
                    if fs.sampled.len() < cfg.sample_contexts {
                        fs.sampled.push(window(a));
                    } else {
                        let r = (rng.next_u64() % seen) as usize;
                        if r < cfg.sample_contexts {
                            fs.sampled[r] = window(a);
                        }
                    }
                });
            }
        }
        // Keep only the sequences some top context is still in.
        kept.retain(|seq, v| {
            let keep = holding.contains_key(seq);
            if !keep {
                kept_entries -= v.iter().map(Vec::len).sum::<usize>();
            }
            keep
        });
        seq0 += b;
        n_tokens += (b * s) as u64;
        bar.inc((b * s) as u64);
        Ok(())
    })?;
    bar.finish();
    for fs in stats.iter_mut().flatten() {
        fs.top.sort_by(|a, b| b.act.total_cmp(&a.act));
        fs.sampled.sort_by(|a, b| b.act.total_cmp(&a.act));
    }
    Ok(Browse { n_tokens, n_seqs, stats, lens: Vec::new(), kept })
}

/// A validated `view-features` run.
#[derive(Debug, Clone)]
pub struct ViewConfig {
    /// Activation cache folder.
    pub acts: PathBuf,
    /// Suite folder, file or hub id.
    pub suite: PathBuf,
    /// `--connections` (`None`: the suite's stored connections, else all).
    pub connections: Option<PathBuf>,
    /// An edges file whose scores are shown for connections that carry none.
    pub edges: Option<PathBuf>,
    /// Model folder or hub id (default: the cache manifest's).
    pub model: Option<String>,
    /// Output folder, and whether an existing, non-empty one is replaced.
    pub out: PathBuf,
    pub overwrite: bool,
    /// Also write each feature's page as the circuit-tracer / Neuronpedia graph UI loads it
    /// (`features/<id>.json`, [`neuronpedia`]).
    pub neuronpedia: bool,
    /// A folder of attribution graphs (`attribute --out`) to draw in `graph.html`.
    pub graphs: Option<PathBuf>,
    pub browse: BrowseConfig,
}

/// What [`run`] wrote.
#[derive(Debug, Clone)]
pub struct ViewSummary {
    /// Features of all modules, and how many of them fired.
    pub n_features: usize,
    pub firing: usize,
    pub n_tokens: u64,
    /// Bytes of the data files and `assets`.
    pub bytes: usize,
    /// The finished page (`<out>/index.html`).
    pub index: PathBuf,
}

/// Collect every feature's statistics over `cfg.acts` and write the browser into `cfg.out`:
/// the data files (see [`page`]) under `data/` and each `(file name, text)` of `assets` (the
/// page itself: index.html, app.js, style.css). On several ranks of `coll` the pass is shared
/// and rank 0 writes (the others return `None`).
pub fn run(
    cfg: &ViewConfig,
    assets: &[(&str, &str)],
    device: &Device,
    coll: &dyn Collective,
) -> Result<Option<ViewSummary>> {
    let inputs = Inputs::open(&cfg.acts, &cfg.suite, cfg.model.as_deref(), device)?;
    let chosen = inputs.choose_connections(cfg.connections.as_deref(), "view-features")?;
    let conns = chosen.set.as_ref();
    let scores = match &cfg.edges {
        Some(p) => page::EdgeScores::new(&inputs.connections(p)?),
        None => page::EdgeScores::default(),
    };
    let graphs = match &cfg.graphs {
        Some(dir) => graphs::read(dir, &inputs.suite.id()?, graphs::MAX_LINKS)?,
        None => Vec::new(),
    };
    let stage = if coll.rank() == 0 { Some(StagedDir::create(&cfg.out, cfg.overwrite, "--out")?) } else { None };
    // One value pass for the statistics and the why-it-fired pass.
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(&inputs.suite, wiring, inputs.parallel(), device)?;
    let pass = ValuePass::new(&inputs.suite, &inputs.model.runtime, &plan, cfg.browse.pass, device)?;
    let mut prof = crate::util::profile::Profile::new();
    let mut browse = collect(&inputs, &pass, &cfg.browse, device, coll)?;
    prof.mark("statistics");
    if coll.rank() == 0 {
        browse.lens = logit_lens(&inputs, cfg.browse.lens, device)?;
    }
    prof.mark("logit lens");
    let Some(stage) = stage else { return Ok(None) };
    let why = why::explain(&inputs, conns, &pass, &browse, &cfg.browse, 5, device)?;
    prof.mark("why it fired");
    let tokenizer = inputs.model.tokenizer()?;
    let page = page::Page {
        browse: &browse,
        suite: &inputs.suite,
        conns,
        scores: &scores,
        tokenizer: &tokenizer,
        suite_path: &cfg.suite,
        acts_path: &cfg.acts,
        connections: chosen.file.as_deref(),
        pass_description: &chosen.pass,
        why: &why,
    };
    let mut bytes = page::write_data(&stage.path().join("data"), &page)?;
    bytes += graphs::write(&stage.path().join("data"), &graphs)?;
    if cfg.neuronpedia {
        neuronpedia::write(&stage.path().join("features"), &browse, &inputs.suite, &tokenizer)?;
    }
    for (name, body) in assets {
        let path = stage.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| crate::error::Error::io(parent, e))?;
        }
        crate::util::io::write_atomic(&path, body.as_bytes())?;
        bytes += body.len();
    }
    let out = stage.commit()?;
    prof.mark("pages");
    prof.report("view-features");
    Ok(Some(ViewSummary {
        n_features: inputs.suite.n_features * inputs.suite.modules.len(),
        firing: browse.stats.iter().flatten().filter(|s| s.count > 0).count(),
        n_tokens: browse.n_tokens,
        bytes,
        index: out.join("index.html"),
    }))
}

/// Entries `(index, value)` in rank order.
type Ranked = Vec<(u32, f32)>;

crate::widest! {
    /// The `n` largest and smallest entries of `row` with their indices, largest first / smallest
    /// first (ties: the lower index first; `f32::total_cmp` order). One pass over the row, each
    /// side kept in a sorted buffer of `n` that a value enters only when it beats the buffer's last
    /// (rare after the first few: about `n·ln(len/n)` entries in a random row). Once both buffers
    /// are full, a block of 16 values none of which beats either last is passed over in one
    /// branch-free test of their order keys (the buffers cannot change inside it).
    fn extremes(row: &[f32], n: usize) -> (Ranked, Ranked) {
        let n = n.min(row.len());
        let (mut top, mut low): (Ranked, Ranked) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
        if n == 0 {
            return (top, low);
        }
        // Scanning in index order, an equal value never beats an entry already kept.
        let keep = |buf: &mut Ranked, i: u32, x: f32, before: fn(f32, f32) -> bool| {
            if buf.len() == n && !before(x, buf[n - 1].1) {
                return;
            }
            let at = buf.partition_point(|&(_, y)| !before(x, y));
            buf.insert(at, (i, x));
            buf.truncate(n);
        };
        for (b, block) in row.chunks(16).enumerate() {
            if top.len() == n && low.len() == n {
                let (hi, lo) = (order_key(top[n - 1].1), order_key(low[n - 1].1));
                if !block.iter().fold(false, |any, &x| any | (order_key(x) > hi) | (order_key(x) < lo)) {
                    continue;
                }
            }
            for (j, &x) in block.iter().enumerate() {
                let i = (16 * b + j) as u32;
                keep(&mut top, i, x, |a, b| a.total_cmp(&b).is_gt());
                keep(&mut low, i, x, |a, b| a.total_cmp(&b).is_lt());
            }
        }
        (top, low)
    }
}

/// Each decoder direction `W_dec[:, j]` through the unembedding `W_U` (as TransformerLens folds
/// it: final LN gain folded in, centred; no LN scale, which a direction does not have).
fn logit_lens(inputs: &Inputs, n: usize, device: &Device) -> Result<Vec<Vec<Lens>>> {
    let w_u = inputs.model.runtime.weights.w_u.to_device(device)?.to_dtype(DType::F32)?;
    let f = inputs.suite.n_features;
    const CHUNK: usize = 256;
    let mut out = Vec::new();
    for ae in &inputs.suite.aes {
        let dec_t = ae.w_dec.as_tensor().t()?.contiguous()?; // (F, D)
        let mut lens = Vec::with_capacity(f);
        for start in (0..f).step_by(CHUNK) {
            let len = CHUNK.min(f - start);
            let logits: Tensor = dec_t.narrow(0, start, len)?.matmul(&w_u)?.to_device(&Device::Cpu)?;
            let v = logits.dim(1)?;
            // Read in place (a chunk's logits are 51 MB at GPT-2's vocabulary), else copied.
            let of = |flat: &[f32]| -> Vec<_> { flat.par_chunks(v.max(1)).map(|row| extremes(row, n)).collect() };
            let rows = match crate::util::with_host_f32(&logits, of) {
                Some(rows) => rows,
                None => of(&logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            };
            lens.extend(rows.into_iter().map(|(top, bottom)| Lens { top, bottom }));
        }
        out.push(lens);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `each_set` visits exactly the values whose bits are not zero (−0 and NaN included), in
    /// order, across whole 16-value chunks, partly set ones and a tail.
    #[test]
    fn each_set_visits_every_value_with_bits_set() {
        for len in [0, 5, 16, 37, 64] {
            let mut v = vec![0f32; len];
            for (i, x) in v.iter_mut().enumerate() {
                *x = match i % 11 {
                    3 => 1.5,
                    7 => -0.0,
                    9 if i > 30 => f32::NAN,
                    _ => 0.0,
                };
            }
            let mut got = Vec::new();
            each_set(&v, |i, x| got.push((i, x.to_bits())));
            let want: Vec<(usize, u32)> =
                v.iter().enumerate().filter(|(_, x)| x.to_bits() != 0).map(|(i, x)| (i, x.to_bits())).collect();
            assert_eq!(got, want, "length {len}");
        }
    }

    #[test]
    fn extremes_are_the_largest_and_smallest_with_ties_by_index() {
        let row = [0.5, -2.0, 3.0, 3.0, -2.0, 0.0];
        let (top, low) = extremes(&row, 3);
        assert_eq!(top, vec![(2, 3.0), (3, 3.0), (0, 0.5)]);
        assert_eq!(low, vec![(1, -2.0), (4, -2.0), (5, 0.0)]);
    }

    /// The one-pass extremes against a full sort, on rows with many ties, infinities and NaN.
    #[test]
    fn extremes_equal_a_full_sort() {
        let mut rng = crate::util::rng::SplitMix(7);
        for len in [1, 5, 40, 1000, 5003] {
            let row: Vec<f32> = (0..len)
                .map(|i| match i % 97 {
                    3 => f32::NAN,
                    5 => f32::INFINITY,
                    7 => f32::NEG_INFINITY,
                    _ => (rng.normal() * 4.0).round() as f32,
                })
                .collect();
            for n in [0, 1, 3, 10, 2000] {
                let mut idx: Vec<u32> = (0..len as u32).collect();
                idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
                let top: Vec<u32> = idx.iter().take(n).copied().collect();
                idx.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]).then(a.cmp(&b)));
                let low: Vec<u32> = idx.iter().take(n).copied().collect();
                let (t, l) = extremes(&row, n);
                assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), top, "len {len} n {n}");
                assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), low, "len {len} n {n}");
            }
        }
    }

    #[test]
    fn top_list_keeps_the_largest() {
        let c = |act: f32| Context { act, seq: 0, pos: 0, at: 0, tokens: vec![], acts: vec![] };
        let mut top = Vec::new();
        for a in [1.0, 5.0, 2.0, 4.0, 3.0, 0.5] {
            push_top(&mut top, 3, a, || c(a));
        }
        let mut got: Vec<f32> = top.iter().map(|x| x.act).collect();
        got.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(got, vec![5.0, 4.0, 3.0]);
    }
}
