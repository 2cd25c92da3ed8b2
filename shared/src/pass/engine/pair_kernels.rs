//! The per-(edge, value) loops of the attention edge terms, vectorised over heads.
//!
//! Both loops walk the edge slots of one downstream feature `i` (their weights `w_h`, H per
//! slot, contiguous in slot order) and, for each slot, the values its upstream column takes in
//! one sequence ([`ColValues`]). What they write is `i`'s own row of the edge buffer `Y[i][p][h]`
//! (forward) or of the weight gradient (backward): S·H floats and C·H floats, both in the
//! nearest cache, while the random reads go to the sequence's small value table (a few bytes
//! per value, a few hundred KB in all). (Walking upstream columns instead makes every pair
//! read and write a random 64-byte line of a buffer of F·8·H floats and stream the F·C·H
//! weights and gradients through the cache once per key block; at TinyStories-33M shape, C 64
//! that cost ~30 ns per pair.)
//!
//! The head count is made a compile-time constant for the real models' 8, 12 and 16 heads, so
//! that one slot's weights and gradient accumulator stay in registers across its values, and
//! the loops are compiled for the widest vector unit the CPU reports ([`crate::widest!`]).
//! Every variant does the same multiplications and additions in the same order as the plain
//! loop, so the results are bit-identical whichever runs (`tests` below checks each against
//! the plain loop).

use crate::pass::plan::EMPTY;

/// One value an upstream column takes in a sequence: its position, where its gradient goes
/// (`vid`, an index into the caller's value-gradient buffer), the factor the edge terms carry
/// (`x = f_u[p, j] / s1[p]`) and `1 / s1[p]`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct ColValue {
    pub pos: u32,
    pub vid: u32,
    pub x: f32,
    pub inv: f32,
}

/// The values of every column in one sequence, by column (CSR), positions ascending within a
/// column. (The attention edge backward also keeps a pre-activation gradient in one: feature
/// i's column holds its non-zero entries, `pos` the token and `x` the gradient.)
#[derive(Default)]
pub(super) struct ColValues {
    ptr: Vec<u32>,
    vals: Vec<ColValue>,
    // Buffers of `fill`, kept across sequences.
    cols: Vec<u32>,
    staged: Vec<ColValue>,
    next: Vec<u32>,
}

impl ColValues {
    /// Rebuild from `(column, value)` items below `n_cols`, given in position order (a stable
    /// counting sort by column keeps that order within each column).
    pub(super) fn fill(&mut self, n_cols: usize, items: impl Iterator<Item = (u32, ColValue)>) {
        self.cols.clear();
        self.staged.clear();
        for (c, v) in items {
            self.cols.push(c);
            self.staged.push(v);
        }
        self.ptr.clear();
        self.ptr.resize(n_cols + 1, 0);
        for &c in &self.cols {
            self.ptr[c as usize + 1] += 1;
        }
        for m in 0..n_cols {
            self.ptr[m + 1] += self.ptr[m];
        }
        self.next.clear();
        self.next.extend_from_slice(&self.ptr[..n_cols]);
        self.vals.clear();
        self.vals.resize(self.staged.len(), ColValue::default());
        for (&c, &v) in self.cols.iter().zip(&self.staged) {
            self.vals[self.next[c as usize] as usize] = v;
            self.next[c as usize] += 1;
        }
    }

    /// The values of column `c`.
    #[inline(always)]
    pub(super) fn col(&self, c: u32) -> &[ColValue] {
        &self.vals[self.ptr[c as usize] as usize..self.ptr[c as usize + 1] as usize]
    }
}

crate::widest! {
    /// Forward: for each slot `(w, col)` of feature `i` and each value of `col`,
    /// `y[pos][·] += w · x`, where `y` is `i`'s row `[p][h]`.
    pub(super) fn push_slots(h: usize, w: &[f32], cols: &[u32], table: &ColValues, y: &mut [f32]) {
        match h {
            8 => push_fixed::<8>(w, cols, table, y),
            12 => push_fixed::<12>(w, cols, table, y),
            16 => push_fixed::<16>(w, cols, table, y),
            _ => push_plain(h, w, cols, table, y),
        }
    }
}

crate::widest! {
    /// Backward: for each slot `(w, col)` of feature `i` and each value of `col` at a position
    /// `≤ p_max` (where `gy`, `i`'s row `[p][h]` of the edge buffer's gradient, can be non-zero),
    /// `gw += gy[pos] · x` and, with `vg`, `vg[vid] += (Σ_h gy[pos][h] · w[h]) · inv`.
    pub(super) fn pull_slots(
        h: usize,
        w: &[f32],
        gw: &mut [f32],
        cols: &[u32],
        table: &ColValues,
        gy: &[f32],
        p_max: u32,
        vg: Option<&mut [f32]>,
    ) {
        match h {
            8 => pull_fixed::<8>(w, gw, cols, table, gy, p_max, vg),
            12 => pull_fixed::<12>(w, gw, cols, table, gy, p_max, vg),
            16 => pull_fixed::<16>(w, gw, cols, table, gy, p_max, vg),
            _ => pull_plain(h, w, gw, cols, table, gy, p_max, vg),
        }
    }
}

#[inline(always)]
fn push_fixed<const H: usize>(w: &[f32], cols: &[u32], table: &ColValues, y: &mut [f32]) {
    for (ws, &col) in w.chunks_exact(H).zip(cols) {
        if col == EMPTY {
            continue;
        }
        // Locals, so that the compiler sees no aliasing with `y` and keeps them in registers.
        let ws: [f32; H] = ws.try_into().expect("chunks_exact gives H");
        for v in table.col(col) {
            let (o, x) = (v.pos as usize * H, v.x);
            let d: &mut [f32; H] = (&mut y[o..o + H]).try_into().expect("H floats");
            let mut out = *d;
            for hh in 0..H {
                out[hh] += ws[hh] * x;
            }
            *d = out;
        }
    }
}

#[inline(always)]
fn push_plain(h: usize, w: &[f32], cols: &[u32], table: &ColValues, y: &mut [f32]) {
    for (ws, &col) in w.chunks_exact(h).zip(cols) {
        if col == EMPTY {
            continue;
        }
        for v in table.col(col) {
            let o = v.pos as usize * h;
            y[o..o + h].iter_mut().zip(ws).for_each(|(d, &wv)| *d += wv * v.x);
        }
    }
}

/// `Σ_h p[h]` in a fixed order: four interleaved partial sums, then pairwise (so that the
/// fixed-head loops vectorise; `h` a multiple of 4 there). The plain loop sums in the same
/// order for any `h`.
#[inline(always)]
fn head_sum(p: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let chunks = p.chunks_exact(4);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..4 {
            acc[l] += c[l];
        }
    }
    ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pull_fixed<const H: usize>(
    w: &[f32],
    gw: &mut [f32],
    cols: &[u32],
    table: &ColValues,
    gy: &[f32],
    p_max: u32,
    mut vg: Option<&mut [f32]>,
) {
    for ((ws, gws), &col) in w.chunks_exact(H).zip(gw.chunks_exact_mut(H)).zip(cols) {
        if col == EMPTY {
            continue;
        }
        let ws: &[f32; H] = ws.try_into().expect("chunks_exact gives H");
        let mut g_acc: [f32; H] = (&*gws).try_into().expect("chunks_exact gives H");
        for v in table.col(col) {
            if v.pos > p_max {
                break;
            }
            let o = v.pos as usize * H;
            let g: &[f32; H] = gy[o..o + H].try_into().expect("H floats");
            let mut prod = [0f32; H];
            for hh in 0..H {
                g_acc[hh] += g[hh] * v.x;
                prod[hh] = g[hh] * ws[hh];
            }
            if let Some(vg) = vg.as_deref_mut() {
                vg[v.vid as usize] += head_sum(&prod) * v.inv;
            }
        }
        gws.copy_from_slice(&g_acc);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pull_plain(
    h: usize,
    w: &[f32],
    gw: &mut [f32],
    cols: &[u32],
    table: &ColValues,
    gy: &[f32],
    p_max: u32,
    mut vg: Option<&mut [f32]>,
) {
    let mut prod = vec![0f32; h];
    for ((ws, gws), &col) in w.chunks_exact(h).zip(gw.chunks_exact_mut(h)).zip(cols) {
        if col == EMPTY {
            continue;
        }
        for v in table.col(col) {
            if v.pos > p_max {
                break;
            }
            let g = &gy[v.pos as usize * h..(v.pos as usize + 1) * h];
            for (((o, pr), &gv), &wv) in gws.iter_mut().zip(prod.iter_mut()).zip(g).zip(ws) {
                *o += gv * v.x;
                *pr = gv * wv;
            }
            if let Some(vg) = vg.as_deref_mut() {
                vg[v.vid as usize] += head_sum(&prod) * v.inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n_slots` slots over `n_cols` columns (every third one empty) and a table of values
    /// at `s` positions, some columns silent.
    fn case(h: usize, n_slots: usize, n_cols: usize, s: usize) -> (Vec<f32>, Vec<u32>, ColValues) {
        let w = (0..n_slots * h).map(|x| ((x as f32) * 0.37).sin()).collect();
        let cols = (0..n_slots).map(|e| if e % 3 == 2 { EMPTY } else { ((e * 7 + 3) % n_cols) as u32 }).collect();
        let mut table = ColValues::default();
        let items = (0..s).flat_map(|p| {
            (0..n_cols).filter(move |c| (c * 5 + p) % 3 != 0 && c % 4 != 1).map(move |c| {
                (
                    c as u32,
                    ColValue {
                        pos: p as u32,
                        vid: (p * n_cols + c) as u32,
                        x: (p as f32 * 1.3 + c as f32).cos(),
                        inv: 0.5 + p as f32 * 0.1,
                    },
                )
            })
        });
        table.fill(n_cols, items);
        (w, cols, table)
    }

    #[test]
    fn the_table_keeps_each_columns_values_in_position_order() {
        let (_, _, t) = case(1, 1, 6, 5);
        for c in 0..6u32 {
            let v = t.col(c);
            assert!(v.windows(2).all(|p| p[0].pos < p[1].pos), "column {c}");
            let want: Vec<u32> =
                (0..5).filter(|p| !(c as usize * 5 + p).is_multiple_of(3) && c % 4 != 1).map(|p| p as u32).collect();
            assert_eq!(v.iter().map(|x| x.pos).collect::<Vec<_>>(), want, "column {c}");
        }
    }

    #[test]
    fn every_variant_matches_the_plain_loops_bit_for_bit() {
        let (s, n_cols) = (9, 11);
        for h in [1, 4, 8, 12, 16] {
            let (w, cols, table) = case(h, 23, n_cols, s);
            let y0: Vec<f32> = (0..s * h).map(|x| (x as f32 * 0.11).cos()).collect();
            let mut want = y0.clone();
            push_plain(h, &w, &cols, &table, &mut want);
            let mut got = y0.clone();
            push_slots(h, &w, &cols, &table, &mut got);
            assert_eq!(got, want, "push, {h} heads");
            assert_ne!(want, y0);

            let gy = y0;
            let gw0: Vec<f32> = (0..w.len()).map(|x| (x as f32 * 0.05).sin()).collect();
            for p_max in [s as u32, 4] {
                let (mut gw_want, mut vg_want) = (gw0.clone(), vec![0.5f32; s * n_cols]);
                pull_plain(h, &w, &mut gw_want, &cols, &table, &gy, p_max, Some(&mut vg_want));
                let (mut gw, mut vg) = (gw0.clone(), vec![0.5f32; s * n_cols]);
                pull_slots(h, &w, &mut gw, &cols, &table, &gy, p_max, Some(&mut vg));
                assert_eq!((&gw, &vg), (&gw_want, &vg_want), "pull, {h} heads, p_max {p_max}");
                assert_ne!(gw_want, gw0);
                let mut gw_only = gw0.clone();
                pull_slots(h, &w, &mut gw_only, &cols, &table, &gy, p_max, None);
                assert_eq!(gw_only, gw_want, "pull without value gradients, {h} heads");
            }
        }
    }

    #[test]
    fn plain_loops_match_a_naive_sum() {
        let (h, s, n_cols) = (3, 6, 5);
        let (w, cols, table) = case(h, 9, n_cols, s);
        let mut y = vec![0f32; s * h];
        push_plain(h, &w, &cols, &table, &mut y);
        // Every (slot, value) pair, naively.
        let pairs: Vec<(usize, ColValue)> = cols
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != EMPTY)
            .flat_map(|(e, &c)| table.col(c).iter().map(move |&v| (e, v)))
            .collect();
        assert!(pairs.len() > 10);
        for p in 0..s {
            for hh in 0..h {
                let want: f32 =
                    pairs.iter().filter(|(_, v)| v.pos as usize == p).map(|(e, v)| w[e * h + hh] * v.x).sum();
                assert!((y[p * h + hh] - want).abs() < 1e-6, "y[{p}][{hh}]");
            }
        }
        let gy: Vec<f32> = (0..s * h).map(|x| (x as f32 * 0.3).sin()).collect();
        let p_max = 3;
        let (mut gw, mut vg) = (vec![0f32; w.len()], vec![0f32; s * n_cols]);
        pull_plain(h, &w, &mut gw, &cols, &table, &gy, p_max, Some(&mut vg));
        let live = |v: &ColValue| v.pos <= p_max;
        for e in 0..cols.len() {
            for hh in 0..h {
                let want: f32 = pairs
                    .iter()
                    .filter(|(pe, v)| *pe == e && live(v))
                    .map(|(_, v)| gy[v.pos as usize * h + hh] * v.x)
                    .sum();
                assert!((gw[e * h + hh] - want).abs() < 1e-6, "gw[{e}][{hh}]");
            }
        }
        for (vid, &got) in vg.iter().enumerate() {
            let want: f32 = pairs
                .iter()
                .filter(|(_, v)| v.vid as usize == vid && live(v))
                .map(|(e, v)| (0..h).map(|hh| gy[v.pos as usize * h + hh] * w[e * h + hh]).sum::<f32>() * v.inv)
                .sum();
            assert!((got - want).abs() < 1e-5, "vg[{vid}]");
        }
    }
}
