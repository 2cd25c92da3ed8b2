//! Gates on the edges (docs/MATH.md, "Learned connections"): with gates, each edge slot's
//! weight is multiplied by its gate before the edge terms run, `w̃ = z · w` (an attention
//! slot's one gate scales all its heads), so the pass is the gated pass of
//! [`crate::pass::autograd::forward_gated`]. The backward turns the gradient of the gated
//! weights into the gates' gradient and the raw weights' one:
//! `∂L/∂z = Σ_h ∂L/∂w̃_h · w_h` and `∂L/∂w_h = z · ∂L/∂w̃_h` (for an mlp edge
//! `∂L/∂w̃ = Σ_t g_i[t] f_j[t] / s2[t]`, the product the weight gradient already forms).

use super::Engine;
use crate::error::{Error, Result};
use crate::pass::Plan;

/// One value per edge slot of every downstream module in its plan's slot order (`(F, width)`
/// row-major): upstream slots and embed slots, `None` where a module has none; and the unembed
/// slots `(V_n, C_u)` when the plan has unembed edges. Gate values in, their gradients out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotValues {
    pub up: Vec<Option<Vec<f32>>>,
    pub embed: Vec<Option<Vec<f32>>>,
    pub unembed: Option<Vec<f32>>,
}

impl SlotValues {
    /// Zeros shaped like `plan`'s slots over `n_mod` modules of `f` features.
    pub fn zeros(plan: &Plan, n_mod: usize, f: usize) -> SlotValues {
        let up = (0..n_mod).map(|d| plan.down(d).index.as_ref().map(|ix| vec![0f32; f * ix.width])).collect();
        let embed = (0..n_mod).map(|d| plan.down(d).embed.as_ref().map(|ep| vec![0f32; f * ep.index.width])).collect();
        let unembed = plan.unembed.as_ref().map(|u| vec![0f32; u.index.slot_col.len()]);
        SlotValues { up, embed, unembed }
    }

    /// Check that these values cover exactly the slots of `plan` (`n_mod` modules of `f`
    /// features).
    pub fn check(&self, plan: &Plan, n_mod: usize, f: usize) -> Result<()> {
        let want = SlotValues::zeros(plan, n_mod, f);
        let shape = |s: &SlotValues| -> Vec<Option<usize>> {
            s.up.iter().chain(&s.embed).chain([&s.unembed]).map(|v| v.as_ref().map(Vec::len)).collect()
        };
        if self.up.len() != n_mod || self.embed.len() != n_mod || shape(self) != shape(&want) {
            return Err(Error::Usage(format!(
                "gates for slots {:?}, but the plan has slots {:?}",
                shape(self),
                shape(&want)
            )));
        }
        Ok(())
    }
}

impl<'a> Engine<'a> {
    /// The gated pass: each edge slot's term times its gate in `gates` (the plan's slots;
    /// docs/MATH.md, "Learned connections"); [`backward_gated`](Self::backward_gated) gives the
    /// gates' gradients.
    pub fn gated(mut self, gates: &'a SlotValues) -> Result<Engine<'a>> {
        gates.check(self.plan, self.suite.modules.len(), self.f)?;
        self.gates = Some(gates);
        Ok(self)
    }

    /// The gates of module `di`'s upstream (`embed` false) or embed slots, when gated.
    pub(super) fn gate_of(&self, di: usize, embed: bool) -> Option<&'a [f32]> {
        let g = self.gates?;
        let list = if embed { &g.embed } else { &g.up };
        list[di].as_deref()
    }

    /// Gate slot-order weights `w` (`per` per slot) of module `di` in place, returning the raw
    /// ones (empty without gates).
    pub(super) fn gate(&self, di: usize, embed: bool, w: &mut [f32], per: usize) -> Vec<f32> {
        match self.gate_of(di, embed) {
            Some(z) => gate_weights(w, z, per),
            None => Vec::new(),
        }
    }

    /// With gates on module `di`'s upstream (`embed` false) or embed slots: turn `gw`, the
    /// gated weights' gradient (slot order, `per` per slot), into the raw weights' and store
    /// the gates' gradient in `gz`.
    pub(super) fn ungate(
        &self,
        di: usize,
        embed: bool,
        gw: &mut [f32],
        raw: &[f32],
        per: usize,
        gz: Option<&mut SlotValues>,
    ) {
        let Some(z) = self.gate_of(di, embed) else { return };
        let g = gate_backward(gw, raw, z, per);
        if let Some(out) = gz {
            let list = if embed { &mut out.embed } else { &mut out.up };
            list[di] = Some(g);
        }
    }
}

/// Multiply each slot's `per` weights (slot order) by its gate; returns the raw weights the
/// backward needs.
pub(super) fn gate_weights(w: &mut [f32], z: &[f32], per: usize) -> Vec<f32> {
    let raw = w.to_vec();
    for (ws, &g) in w.chunks_exact_mut(per).zip(z) {
        ws.iter_mut().for_each(|x| *x *= g);
    }
    raw
}

/// Given `gw`, the gradient of the gated weights (slot order, `per` per slot), and the raw
/// weights: returns the gates' gradient `Σ_h gw_h · w_h` per slot and turns `gw` into the raw
/// weights' gradient `z · gw`.
pub(super) fn gate_backward(gw: &mut [f32], raw: &[f32], z: &[f32], per: usize) -> Vec<f32> {
    gw.chunks_exact_mut(per)
        .zip(raw.chunks_exact(per))
        .zip(z)
        .map(|((g, w), &zv)| {
            let gz = g.iter().zip(w).map(|(a, b)| a * b).sum();
            g.iter_mut().for_each(|x| *x *= zv);
            gz
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_backward_is_the_chain_rule_of_gate_weights() {
        let per = 3;
        let raw: Vec<f32> = (0..12).map(|x| (x as f32 * 0.7).sin()).collect();
        let z = [0.5f32, 0.0, 1.0, 0.25];
        let mut w = raw.clone();
        let kept = gate_weights(&mut w, &z, per);
        assert_eq!(kept, raw);
        for (s, &zv) in z.iter().enumerate() {
            for h in 0..per {
                assert_eq!(w[s * per + h], raw[s * per + h] * zv);
            }
        }
        // L = Σ c · w̃ with c the gradient of the gated weights: ∂L/∂z_s = Σ_h c_h w_h,
        // ∂L/∂w_h = z_s c_h.
        let c: Vec<f32> = (0..12).map(|x| (x as f32 * 0.3).cos()).collect();
        let mut gw = c.clone();
        let gz = gate_backward(&mut gw, &raw, &z, per);
        for s in 0..4 {
            let want: f32 = (0..per).map(|h| c[s * per + h] * raw[s * per + h]).sum();
            assert!((gz[s] - want).abs() < 1e-6);
            for h in 0..per {
                assert_eq!(gw[s * per + h], z[s] * c[s * per + h]);
            }
        }
    }
}
