//! What the edge terms read from the upstream modules: their active values per token, the
//! gradients of those values, and `W_decᵀ W_V` on the rows of the features active in a batch.

use super::ModuleState;
use crate::pass::plan::EMPTY;
use crate::util::blas::{add_into, sgemm};

/// The non-zero selected values of the upstream modules `ups` at token `t`, in (module,
/// top-k slot) order: `(pu, kk, v, col)` with `col = pu·F + feature`, the feature's column
/// among the concatenated upstream features.
pub(crate) fn active_ups<'s>(
    states: &'s [ModuleState],
    ups: &'s [usize],
    t: usize,
    k: usize,
    f: usize,
) -> impl Iterator<Item = (usize, usize, f32, usize)> + 's {
    ups.iter().enumerate().flat_map(move |(pu, &u)| {
        let st = &states[u];
        (0..k).filter_map(move |kk| {
            let v = st.val[t * k + kk];
            (v != 0.0).then(|| (pu, kk, v, pu * f + st.idx[t * k + kk] as usize))
        })
    })
}

/// Add `scratch (N, |U|, K)` — the gradient of every upstream module's selected values that
/// one downstream module's edges produced — into the per-module totals `g_val_up[u] (N, K)`.
pub(crate) fn add_up_value_grads(ups: &[usize], scratch: &[f32], n: usize, k: usize, g_val_up: &mut [Vec<f32>]) {
    for (pu, &u) in ups.iter().enumerate() {
        let gvu = &mut g_val_up[u];
        for t in 0..n {
            let src = &scratch[(t * ups.len() + pu) * k..(t * ups.len() + pu + 1) * k];
            add_into(&mut gvu[t * k..(t + 1) * k], src);
        }
    }
}

/// `W_decᵀ W_V (·, H·dh)` of one upstream module on the rows of its features active in the
/// batch.
#[derive(Default)]
pub(crate) struct ActiveRows {
    /// The active features, ascending.
    pub(super) rows: Vec<u32>,
    /// Feature -> its row in `vals`, or EMPTY.
    map: Vec<u32>,
    vals: Vec<f32>,
}

impl ActiveRows {
    /// `dec_row(j) · W_V (D, H·dh)` for each of `rows` (ascending, below `n_cols`).
    pub(super) fn build<'r>(
        rows: Vec<u32>,
        n_cols: usize,
        dec_row: impl Fn(u32) -> &'r [f32],
        w_v: &[f32],
        d: usize,
        hd: usize,
    ) -> ActiveRows {
        let mut map = vec![EMPTY; n_cols];
        let mut dec = Vec::with_capacity(rows.len() * d);
        for (m, &j) in rows.iter().enumerate() {
            map[j as usize] = m as u32;
            dec.extend_from_slice(dec_row(j));
        }
        let mut vals = vec![0f32; rows.len() * hd];
        sgemm(rows.len(), hd, d, &dec, d, 1, w_v, hd, 1, &mut vals, false, true);
        ActiveRows { rows, map, vals }
    }

    /// Let go of the values, keeping which rows they were (to [`build`](Self::build) them
    /// again, the same bits: the same product on the same rows).
    pub(super) fn drop_values(&mut self) {
        self.vals = Vec::new();
        self.map = Vec::new();
    }

    /// Bytes the values hold.
    pub(super) fn value_bytes(&self) -> usize {
        self.vals.len() * std::mem::size_of::<f32>()
    }

    /// Feature `j`'s row (`width` values), if it is active.
    pub(super) fn row(&self, j: usize, width: usize) -> Option<&[f32]> {
        let m = self.map[j];
        (m != EMPTY).then(|| &self.vals[m as usize * width..(m as usize + 1) * width])
    }
}
