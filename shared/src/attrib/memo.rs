//! Rows attribution reads from model and suite matrices alone — features' encoder rows and
//! decoder columns, `E W_Oᵀ` of an attention module's features, `W_decᵀ W_V` of an upstream
//! module's features and token and positional rows through an attention layer's `W_V` — which
//! no sequence changes. view-features
//! explains thousands of top contexts with the same few thousand rows; [`Products::kept`] forms
//! each row once per run (within a memory budget).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::Tensor;

use super::Rows;
use crate::error::Result;

/// Which rows, one per feature of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// Module `m`'s encoder rows `E_i`.
    Enc(usize),
    /// Module `m`'s decoder columns `W_dec[:, j]`.
    Dec(usize),
    /// `E_i W_Oᵀ` of attention module `m`.
    EncWo(usize),
    /// `W_dec^u[:, j]ᵀ W_V` from module `u` into attention module `m`: `(u, m)`.
    DecWv(usize, usize),
    /// `W_E[t] W_V` of token `t` into attention module `m`.
    TokWv(usize),
    /// `W_pos[p] W_V` of position `p` into attention module `m`.
    PosWv(usize),
}

/// Rows formed on demand and, when kept, remembered. Graphs may be formed on several threads
/// at once: the lock is never held while rows are formed (a product runs on the thread pool,
/// whose waiting threads may pick up another graph's task); two threads may then form the same
/// rows, with the same bits.
pub struct Products {
    kept: Option<Mutex<Kept>>,
}

struct Kept {
    rows: HashMap<Key, HashMap<u32, Vec<f32>>>,
    /// Bytes still free for rows; rows formed beyond the budget are not kept.
    free: usize,
}

impl Products {
    /// Form every row again each time (one graph).
    pub fn fresh() -> Products {
        Products { kept: None }
    }

    /// Remember the rows formed, up to `max_bytes` of them (many graphs of one suite and model).
    pub fn kept(max_bytes: usize) -> Products {
        Products { kept: Some(Mutex::new(Kept { rows: HashMap::new(), free: max_bytes })) }
    }

    fn lock(kept: &Mutex<Kept>) -> MutexGuard<'_, Kept> {
        // A thread that panicked holding it left whole rows or none.
        kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rows `ids` of `key`, one per id, `width` floats each; `form(ids)` forms rows of it as an
    /// `(ids.len(), width)` tensor. Too few rows are formed beside copies of the first: the GEMM
    /// kernel sums in another order for one row, for products of at most 256 outputs and for
    /// both sides at most 64, and a row's bits must not depend on which rows it was formed with.
    pub(super) fn rows(
        &self,
        key: Key,
        ids: &[u32],
        width: usize,
        form: impl Fn(&[u32]) -> Result<Tensor>,
    ) -> Result<Rows> {
        let least = if width <= 64 { 65 } else { 257usize.div_ceil(width).max(2) };
        let form = |ids: &[u32]| -> Result<Rows> {
            if ids.is_empty() || ids.len() >= least {
                return Rows::of(&form(ids)?);
            }
            let mut padded = ids.to_vec();
            padded.resize(least, ids[0]);
            Rows::of(&form(&padded)?.narrow(0, 0, ids.len())?)
        };
        let Some(kept) = self.kept.as_ref().filter(|_| !ids.is_empty()) else { return form(ids) };
        let mut missing: Vec<u32> = {
            let k = Self::lock(kept);
            let memo = k.rows.get(&key);
            ids.iter().copied().filter(|j| memo.is_none_or(|m| !m.contains_key(j))).collect()
        };
        missing.sort_unstable();
        missing.dedup();
        let new = if missing.is_empty() { Rows { data: Vec::new(), width: 0 } } else { form(&missing)? };
        let mut kept = Self::lock(kept);
        let Kept { rows, free } = &mut *kept;
        let memo = rows.entry(key).or_default();
        let mut data = Vec::with_capacity(ids.len() * width);
        for j in ids {
            match missing.binary_search(j) {
                Ok(r) => data.extend_from_slice(new.row(r)),
                Err(_) => data.extend_from_slice(&memo[j]),
            }
        }
        for (r, &j) in missing.iter().enumerate() {
            if *free < width * 4 {
                break;
            }
            // (Another thread may have kept it meanwhile, with the same bits.)
            if let std::collections::hash_map::Entry::Vacant(e) = memo.entry(j) {
                *free -= width * 4;
                e.insert(new.row(r).to_vec());
            }
        }
        Ok(Rows { data, width })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// `x · w` over rows `ids` of `x`.
    fn product<'a>(x: &'a Tensor, w: &'a Tensor) -> impl Fn(&[u32]) -> Result<Tensor> + 'a {
        move |ids| {
            let idx = Tensor::new(ids, &Device::Cpu)?;
            Ok(x.index_select(&idx, 0)?.matmul(w)?)
        }
    }

    #[test]
    fn kept_rows_are_bit_equal_to_rows_formed_all_at_once() {
        let (f, d) = (40usize, 96usize);
        let wave = |n: usize, a: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * a).sin()).collect() };
        let x = Tensor::from_vec(wave(f * d, 0.37), (f, d), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(wave(d * d, 0.11), (d, d), &Device::Cpu).unwrap();
        let all: Vec<u32> = (0..f as u32).collect();
        // A square right operand, and a narrow transposed one (`E W_Oᵀ` at a toy width, where the
        // kernel's small-product paths would round a few rows otherwise).
        let narrow = Tensor::from_vec(wave(24 * d, 0.23), (24, d), &Device::Cpu).unwrap().t().unwrap();
        for (w, width) in [(&w, d), (&narrow, 24)] {
            let whole = crate::util::to_vec(&product(&x, w)(&all).unwrap()).unwrap();
            let kept = Products::kept(usize::MAX);
            // Formed in pieces of 1, 3 and the rest.
            for ids in [vec![7u32], vec![2, 30, 7], all.clone(), vec![39, 0]] {
                let got = kept.rows(Key::Enc(0), &ids, width, product(&x, w)).unwrap().data;
                let want: Vec<f32> =
                    ids.iter().flat_map(|&j| whole[j as usize * width..(j as usize + 1) * width].to_vec()).collect();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "width {width}, rows {ids:?}"
                );
                let fresh = Products::fresh().rows(Key::Enc(0), &ids, width, product(&x, w)).unwrap().data;
                assert_eq!(fresh, got);
            }
        }
        // Formed from several threads at once (graphs side by side): the same bits, each row
        // kept once.
        let whole = crate::util::to_vec(&product(&x, &w)(&all).unwrap()).unwrap();
        let shared = Products::kept(usize::MAX);
        let sets: Vec<Vec<u32>> = (0..16u32).map(|t| (0..12).map(|i| (t * 7 + i * 5) % f as u32).collect()).collect();
        use rayon::prelude::*;
        sets.par_iter().for_each(|ids| {
            let got = shared.rows(Key::Dec(2), ids, d, product(&x, &w)).unwrap().data;
            let want: Vec<f32> =
                ids.iter().flat_map(|&j| whole[j as usize * d..(j as usize + 1) * d].to_vec()).collect();
            assert_eq!(got, want, "rows {ids:?}");
        });
        let kept_rows = shared.kept.as_ref().unwrap().lock().unwrap().rows[&Key::Dec(2)].len();
        assert_eq!(kept_rows, f);
        // A kept row is not formed again; beyond the budget (room for 2 rows here) rows are
        // formed and returned, not kept.
        let kept = Products::kept(usize::MAX);
        kept.rows(Key::Enc(0), &[5, 6], d, product(&x, &w)).unwrap();
        let formed = std::cell::Cell::new(0);
        let counted = |ids: &[u32]| {
            formed.set(formed.get() + ids.len());
            product(&x, &w)(ids)
        };
        assert_eq!(kept.rows(Key::Enc(0), &[5, 6], d, counted).unwrap().data.len(), 2 * d);
        assert_eq!(formed.get(), 0);
        let small = Products::kept(2 * d * 4 + 1);
        let got = small.rows(Key::Dec(1), &[4, 9, 1], d, counted).unwrap().data;
        let want: Vec<f32> = [4usize, 9, 1].iter().flat_map(|&j| whole[j * d..(j + 1) * d].to_vec()).collect();
        assert_eq!((got, formed.get()), (want, 3));
        small.rows(Key::Dec(1), &[1, 4], d, counted).unwrap();
        assert_eq!(formed.get(), 3);
        // Row 9 was not kept; alone it is formed beside copies (3 rows: 257 outputs at width 96).
        small.rows(Key::Dec(1), &[9], d, counted).unwrap();
        assert_eq!(formed.get(), 6);
    }
}
