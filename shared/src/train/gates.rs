//! Hard-concrete gates on candidate edges (docs/MATH.md, "Learned connections"): one `log α`
//! per candidate slot of each downstream module (its upstream slots `(F, C)` and its embed slots
//! `(F, C_e)`, in the plan's slot order) and of each output token (the unembed slots `(V_n,
//! C_u)`, when the candidates have them), sampled per step into the gates the pruned pass
//! multiplies each edge's term by; the expected-L0 penalty that pulls each feature towards C
//! open gates (each token towards its own C); Adam on the `log α`; and the binarisation into a
//! connection set.
//!
//! `s = σ((ln u − ln(1−u) + log α)/β)`, `z̄ = clamp(s(ζ−γ)+γ, 0, 1)` with γ = −0.1, ζ = 1.1;
//! hard mode `z = 1[z̄ > 0.5] + z̄ − sg(z̄)` (straight-through), relaxed mode `z = z̄`;
//! `p = σ(log α − β ln(−γ/ζ))` the probability that a relaxed gate is non-zero, `σ(log α)`
//! that a hard one is 1.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::formats::connections::{Connections, EmbedEdge};
use crate::pass::autograd::Gates;
use crate::pass::Plan;
use crate::train::optim::AdamStep;
use crate::util::rng::SplitMix;

pub const GAMMA: f64 = -0.1;
pub const ZETA: f64 = 1.1;

/// `1 / (1 + e^(−x))`, its gradient `σ(1 − σ)` from the result (finite for any x, unlike the
/// composed ops' `e^(−x) / (1 + e^(−x))²` once `e^(−x)` overflows).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

/// How the forward pass uses a gate sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    /// `1[z̄ > 0.5]` forward, the relaxed gate's gradient backward (the reference).
    Hard,
    /// The relaxed gate `z̄` forward and backward.
    Relaxed,
}

/// How `log α` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateInit {
    /// N(0, 0.01), the reference's.
    Zero,
    /// +1 for each feature's top-C candidates by score, −1 for the others (plus N(0, 0.01)).
    Scores,
}

/// One module's gate parameters over a set of slots.
pub struct SlotGates {
    pub log_alpha: Var,
    /// 1 for a used slot, 0 for an empty one `(F, C)`.
    pub used: Tensor,
    pub width: usize,
}

/// The gates of every downstream module, and of the unembedding.
pub struct GateParams {
    pub up: Vec<Option<SlotGates>>,
    pub embed: Vec<Option<SlotGates>>,
    pub unembed: Option<SlotGates>,
    /// Per feature of every module (in module order), then per output token of the unembed
    /// slots, how many candidates it has, capped at its C: its target count of open gates
    /// `(modules·F + V_n)`.
    pub target: Tensor,
    pub n_features: usize,
}

/// The positions of the `c` largest of `values` (ties by position), in position order.
fn top_positions(values: impl Iterator<Item = f32>, c: usize) -> Vec<usize> {
    let mut all: Vec<(f32, usize)> = values.zip(0..).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all.truncate(c);
    let mut kept: Vec<usize> = all.into_iter().map(|(_, k)| k).collect();
    kept.sort_unstable();
    kept
}

/// Flags of the `c` largest of `values` (ties by position).
fn top_flags(values: impl ExactSizeIterator<Item = f32>, c: usize) -> Vec<bool> {
    let mut open = vec![false; values.len()];
    top_positions(values, c).into_iter().for_each(|k| open[k] = true);
    open
}

/// The top-C candidates of feature `i` of module `d` by score (ties by list order): the
/// positions of its upstream and embed candidates that `--init scores` opens.
fn top_by_score(cands: &Connections, d: usize, i: usize, c: usize) -> (Vec<bool>, Vec<bool>) {
    let (ups, emb) = (&cands.edges[d][i], &cands.embed[d][i]);
    let scores: Vec<f32> = ups.iter().map(|e| e.score).chain(emb.iter().map(|e| e.score)).collect();
    let mut open = top_flags(scores.into_iter(), c);
    let emb_open = open.split_off(ups.len());
    (open, emb_open)
}

impl GateParams {
    /// Gates on every candidate of `cands` as wired by `plan`, targeting `c` per feature (and
    /// `unembed_c` per output token, on unembed candidates).
    pub fn new(
        plan: &Plan,
        cands: &Connections,
        (c, unembed_c): (usize, usize),
        init: GateInit,
        seed: u64,
        device: &Device,
    ) -> Result<GateParams> {
        let f = cands.n_features;
        let mut rng = SplitMix(seed ^ 0x9a7e_5eed);
        let (mut up, mut embed) = (Vec::new(), Vec::new());
        let mut target = Vec::with_capacity(cands.modules.len() * f);
        // Gates over `width` slots of `open.len()` rows, `open[i][k]`: whether `--init scores`
        // opens slot k of row i (the row's used slots).
        let mut make = |width: usize, open: &[Vec<bool>]| -> Result<SlotGates> {
            let rows = open.len();
            let (mut la, mut used) = (vec![0f32; rows * width], vec![0f32; rows * width]);
            for (i, open) in open.iter().enumerate() {
                for (k, &top) in open.iter().enumerate() {
                    let noise = 0.01 * rng.normal();
                    la[i * width + k] = (match init {
                        GateInit::Zero => 0.0,
                        GateInit::Scores if top => 1.0,
                        GateInit::Scores => -1.0,
                    } + noise) as f32;
                    used[i * width + k] = 1.0;
                }
            }
            Ok(SlotGates {
                log_alpha: Var::from_tensor(&Tensor::from_vec(la, (rows, width), device)?)?,
                used: Tensor::from_vec(used, (rows, width), device)?,
                width,
            })
        };
        for d in 0..cands.modules.len() {
            let width_up = plan.down(d).index.as_ref().map(|ix| ix.width);
            let width_e = plan.down(d).embed.as_ref().map(|ep| ep.index.width);
            // Each feature's candidates that `--init scores` opens: (module, embed) flags.
            let (open_up, open_e): (Vec<Vec<bool>>, Vec<Vec<bool>>) =
                (0..f).map(|i| top_by_score(cands, d, i, c)).unzip();
            let has_ups = cands.edges[d].iter().any(|e| !e.is_empty());
            up.push(match width_up {
                Some(w) if has_ups => Some(make(w, &open_up)?),
                _ => None,
            });
            embed.push(match width_e {
                Some(w) => Some(make(w, &open_e)?),
                None => None,
            });
            for i in 0..f {
                target.push((cands.edges[d][i].len() + cands.embed[d][i].len()).min(c) as f32);
            }
        }
        // The unembed slots: each token's top `unembed_c` candidates by score open under
        // `--init scores`.
        let unembed = match &plan.unembed {
            Some(u) if cands.n_unembed_edges() > 0 => {
                let open: Vec<Vec<bool>> =
                    cands.unembed.iter().map(|es| top_flags(es.iter().map(|e| e.score), unembed_c)).collect();
                target.extend(cands.unembed.iter().map(|es| es.len().min(unembed_c) as f32));
                Some(make(u.index.width, &open)?)
            }
            _ => None,
        };
        let n = target.len();
        Ok(GateParams { up, embed, unembed, target: Tensor::from_vec(target, n, device)?, n_features: f })
    }

    /// Every gate set with its name (`up.<module>`, `embed.<module>`, `unembed`), in the order
    /// of [`vars`](Self::vars).
    pub fn named(&self, modules: &[String]) -> Vec<(String, &SlotGates)> {
        let mut out = Vec::new();
        for (kind, list) in [("up", &self.up), ("embed", &self.embed)] {
            for (d, g) in list.iter().enumerate() {
                if let Some(g) = g {
                    out.push((format!("{kind}.{}", modules[d]), g));
                }
            }
        }
        if let Some(g) = &self.unembed {
            out.push(("unembed".to_string(), g));
        }
        out
    }

    /// Every `log α` variable, upstream slots then embed slots, module by module.
    pub fn vars(&self) -> Vec<&Var> {
        self.up.iter().chain(&self.embed).chain([&self.unembed]).flatten().map(|g| &g.log_alpha).collect()
    }

    /// The gates of one step at temperature `beta`, with uniform noise from `seed` (the same
    /// seed gives the same gates: a resumed run draws what the uninterrupted one drew).
    pub fn sample(&self, beta: f64, mode: GateMode, seed: u64) -> Result<Gates> {
        let mut rng = SplitMix(seed);
        let mut one = |g: &SlotGates| -> Result<Tensor> {
            let la = g.log_alpha.as_tensor();
            let n = la.elem_count();
            let u: Vec<f32> = (0..n).map(|_| (rng.uniform() * (1.0 - 2e-7) + 1e-7) as f32).collect();
            let u = Tensor::from_vec(u, la.dims(), la.device())?;
            let noise = (u.log()? - u.affine(-1.0, 1.0)?.log()?)?;
            let s = sigmoid(&((noise + la)? / beta)?)?;
            let zbar = ((s * (ZETA - GAMMA))? + GAMMA)?.clamp(0f32, 1f32)?;
            let z = match mode {
                GateMode::Relaxed => zbar,
                GateMode::Hard => {
                    let hard = zbar.gt(0.5)?.to_dtype(DType::F32)?;
                    ((hard + &zbar)? - zbar.detach())?
                }
            };
            Ok((z * &g.used)?)
        };
        let up = self.up.iter().map(|g| g.as_ref().map(&mut one).transpose()).collect::<Result<_>>()?;
        let embed = self.embed.iter().map(|g| g.as_ref().map(&mut one).transpose()).collect::<Result<_>>()?;
        let unembed = self.unembed.as_ref().map(&mut one).transpose()?;
        Ok(Gates { up, embed, unembed })
    }

    /// The probability that each gate is open in the forward pass, on used slots (0 on empty
    /// ones): hard gates are 1 exactly when `ln u − ln(1−u) + log α > 0`, so `σ(log α)` at any
    /// β; a relaxed gate is non-zero with probability `σ(log α − β ln(−γ/ζ))` (the reference's
    /// expected L0, which it also uses for its hard gates, where it overstates the open gates
    /// by a factor that grows with β).
    fn open_probability(g: &SlotGates, beta: f64, mode: GateMode) -> Result<Tensor> {
        let shift = match mode {
            GateMode::Hard => 0.0,
            GateMode::Relaxed => beta * (-GAMMA / ZETA).ln(),
        };
        Ok((sigmoid(&(g.log_alpha.as_tensor() - shift)?)? * &g.used)?)
    }

    /// Each feature's expected number of open gates: its upstream and embed slots'
    /// probabilities added, then each output token's over its unembed slots (`target`'s rows).
    pub fn expected_counts(&self, beta: f64, mode: GateMode) -> Result<Tensor> {
        let f = self.n_features;
        let dev = self.target.device();
        let mut per = Vec::new();
        for (u, e) in self.up.iter().zip(&self.embed) {
            let mut count = Tensor::zeros(f, DType::F32, dev)?;
            for g in [u, e].into_iter().flatten() {
                count = (count + Self::open_probability(g, beta, mode)?.sum(1)?)?;
            }
            per.push(count);
        }
        if let Some(g) = &self.unembed {
            per.push(Self::open_probability(g, beta, mode)?.sum(1)?);
        }
        Ok(Tensor::cat(&per, 0)?)
    }

    /// The penalty `mean_i (Σ_j p_ij − t_i)²` over every feature of every module (and every
    /// output token of the unembed slots), `t_i` = min(its C, its candidates).
    pub fn penalty(&self, beta: f64, mode: GateMode) -> Result<Tensor> {
        self.penalty_of(&self.expected_counts(beta, mode)?)
    }

    /// [`penalty`](Self::penalty) from the expected counts already formed.
    pub fn penalty_of(&self, counts: &Tensor) -> Result<Tensor> {
        Ok((counts - &self.target)?.sqr()?.mean_all()?)
    }

    /// The connection set: each feature's top-C candidates by `log α` (ties by list order),
    /// pooled over its upstream and embed candidates, and each output token's top `unembed_c`
    /// unembed candidates; `log α` of every kept edge for the `gate` column, by (module,
    /// feature, kept edge) and by (token, kept edge).
    pub fn binarise(&self, cands: &Connections, (c, unembed_c): (usize, usize)) -> Result<Binarised> {
        let f = cands.n_features;
        let mut out = Connections::empty(&cands.modules, f);
        let mut gates = vec![vec![Vec::new(); f]; cands.modules.len()];
        for d in 0..cands.modules.len() {
            let host = |g: &Option<SlotGates>| -> Result<Option<(Vec<f32>, usize)>> {
                g.as_ref().map(|g| Ok((crate::util::to_vec(g.log_alpha.as_tensor())?, g.width))).transpose()
            };
            let (up, emb) = (host(&self.up[d])?, host(&self.embed[d])?);
            for i in 0..f {
                let ups = &cands.edges[d][i];
                let embs = &cands.embed[d][i];
                let la = |g: &Option<(Vec<f32>, usize)>, k: usize| g.as_ref().map_or(0.0, |(v, w)| v[i * w + k]);
                let all: Vec<f32> =
                    (0..ups.len()).map(|k| la(&up, k)).chain((0..embs.len()).map(|k| la(&emb, k))).collect();
                for k in top_positions(all.iter().copied(), c) {
                    if k < ups.len() {
                        out.edges[d][i].push(ups[k]);
                    } else {
                        let e: EmbedEdge = embs[k - ups.len()];
                        out.embed[d][i].push(e);
                    }
                    gates[d][i].push(all[k]);
                }
            }
        }
        let mut unembed_gates = vec![Vec::new(); cands.unembed.len()];
        if let Some(g) = &self.unembed {
            let (la, w) = (crate::util::to_vec(g.log_alpha.as_tensor())?, g.width);
            out.unembed = vec![Vec::new(); cands.unembed.len()];
            for (v, es) in cands.unembed.iter().enumerate() {
                let row = &la[v * w..v * w + es.len()];
                let kept = top_positions(row.iter().copied(), unembed_c);
                out.unembed[v] = kept.iter().map(|&k| es[k]).collect();
                unembed_gates[v] = kept.iter().map(|&k| row[k]).collect();
            }
        }
        Ok((out, gates, unembed_gates))
    }
}

/// [`GateParams::binarise`]'s result: the connections, and the kept edges' `log α` by
/// (module, feature, edge) and by (token, unembed edge).
pub type Binarised = (Connections, Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>);

/// Adam on the `log α` variables (betas 0.9, 0.999, eps 1e-8; the suite's device optimizer's
/// update, [`AdamStep`]).
pub struct GateAdam {
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl GateAdam {
    pub fn new(vars: &[&Var]) -> Result<GateAdam> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(GateAdam {
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with gradients `grads` (one per variable) at learning rate `lr`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let Some(first) = vars.first() else { return Ok(()) };
        let adam = AdamStep::new((0.9, 0.999, 1e-8), self.t, lr, first.as_tensor().device())?;
        for (k, (var, g)) in vars.iter().zip(grads).enumerate() {
            adam.apply(var, g, &mut self.m[k], &mut self.v[k])?;
        }
        Ok(())
    }
}
