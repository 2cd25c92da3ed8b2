//! The per-(edge, value) loops of the attention edge terms, vectorised over heads.
//!
//! Both loops walk the edges of one upstream column (their weights `w_h`, H per edge,
//! contiguous in column order) against that column's active values in one key block (at most
//! one per key position). The head count is made a compile-time constant for the real models'
//! 8, 12 and 16 heads, so that one edge's weights and gradient accumulator stay in registers
//! across the column's values, and the loops are compiled for the widest vector unit the CPU
//! reports ([`crate::widest!`]).
//!
//! Every variant does the same multiplications and additions in the same order as the plain
//! loop, so the results are bit-identical whichever runs (`tests` below checks each against
//! the plain loop).

/// One active value of a column in a key block: its key position within the block and the
/// factor the edge terms carry (`f_u[p, j] / s1[p]`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct BlockValue {
    pub pos: u32,
    pub x: f32,
}

crate::widest! {
    /// Forward: for each edge `(w, i)` of the column and each value,
    /// `y[i][pos][·] += w · x`, where `y` is laid out `[i][key in block][h]` with `stride`
    /// floats per feature.
    pub(super) fn push_column(h: usize, stride: usize, w: &[f32], downs: &[u32], vals: &[BlockValue], y: &mut [f32]) {
        push_by_heads(h, stride, w, downs, vals, y)
    }
}

crate::widest! {
    /// Backward: for each edge `(w, i)` of the column, `gw += Σ_values gY[i][pos] · x` (values
    /// in order), and for each value, `acc[value] += gY[i][pos] ⊙ w` (edges in order); `gy` is
    /// laid out as `y` above, `acc` holds H floats per value.
    pub(super) fn pull_column(
        h: usize,
        stride: usize,
        w: &[f32],
        gw: &mut [f32],
        downs: &[u32],
        vals: &[BlockValue],
        gy: &[f32],
        acc: &mut [f32],
    ) {
        pull_by_heads(h, stride, w, gw, downs, vals, gy, acc)
    }
}

#[inline(always)]
fn push_by_heads(h: usize, stride: usize, w: &[f32], downs: &[u32], vals: &[BlockValue], y: &mut [f32]) {
    match h {
        8 => push_fixed::<8>(stride, w, downs, vals, y),
        12 => push_fixed::<12>(stride, w, downs, vals, y),
        16 => push_fixed::<16>(stride, w, downs, vals, y),
        _ => push_plain(h, stride, w, downs, vals, y),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pull_by_heads(
    h: usize,
    stride: usize,
    w: &[f32],
    gw: &mut [f32],
    downs: &[u32],
    vals: &[BlockValue],
    gy: &[f32],
    acc: &mut [f32],
) {
    match h {
        8 => pull_fixed::<8>(stride, w, gw, downs, vals, gy, acc),
        12 => pull_fixed::<12>(stride, w, gw, downs, vals, gy, acc),
        16 => pull_fixed::<16>(stride, w, gw, downs, vals, gy, acc),
        _ => pull_plain(h, stride, w, gw, downs, vals, gy, acc),
    }
}

#[inline(always)]
fn push_fixed<const H: usize>(stride: usize, w: &[f32], downs: &[u32], vals: &[BlockValue], y: &mut [f32]) {
    for (ws, &i) in w.chunks_exact(H).zip(downs) {
        let ws: &[f32; H] = ws.try_into().expect("chunks_exact gives H");
        let row = &mut y[i as usize * stride..(i as usize + 1) * stride];
        for v in vals {
            let o = v.pos as usize * H;
            let d: &mut [f32; H] = (&mut row[o..o + H]).try_into().expect("H floats");
            for hh in 0..H {
                d[hh] += ws[hh] * v.x;
            }
        }
    }
}

#[inline(always)]
fn push_plain(h: usize, stride: usize, w: &[f32], downs: &[u32], vals: &[BlockValue], y: &mut [f32]) {
    for (ws, &i) in w.chunks_exact(h).zip(downs) {
        let row = &mut y[i as usize * stride..(i as usize + 1) * stride];
        for v in vals {
            let o = v.pos as usize * h;
            row[o..o + h].iter_mut().zip(ws).for_each(|(d, &wv)| *d += wv * v.x);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pull_fixed<const H: usize>(
    stride: usize,
    w: &[f32],
    gw: &mut [f32],
    downs: &[u32],
    vals: &[BlockValue],
    gy: &[f32],
    acc: &mut [f32],
) {
    let acc = &mut acc[..vals.len() * H];
    for ((ws, gws), &i) in w.chunks_exact(H).zip(gw.chunks_exact_mut(H)).zip(downs) {
        let ws: &[f32; H] = ws.try_into().expect("chunks_exact gives H");
        let mut g_acc: [f32; H] = (&*gws).try_into().expect("chunks_exact gives H");
        let gyi = &gy[i as usize * stride..(i as usize + 1) * stride];
        for (v, ac) in vals.iter().zip(acc.chunks_exact_mut(H)) {
            let o = v.pos as usize * H;
            let g: &[f32; H] = gyi[o..o + H].try_into().expect("H floats");
            let ac: &mut [f32; H] = ac.try_into().expect("chunks_exact gives H");
            for hh in 0..H {
                g_acc[hh] += g[hh] * v.x;
                ac[hh] += g[hh] * ws[hh];
            }
        }
        gws.copy_from_slice(&g_acc);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pull_plain(
    h: usize,
    stride: usize,
    w: &[f32],
    gw: &mut [f32],
    downs: &[u32],
    vals: &[BlockValue],
    gy: &[f32],
    acc: &mut [f32],
) {
    for ((ws, gws), &i) in w.chunks_exact(h).zip(gw.chunks_exact_mut(h)).zip(downs) {
        let gyi = &gy[i as usize * stride..(i as usize + 1) * stride];
        for (v, ac) in vals.iter().zip(acc.chunks_exact_mut(h)) {
            let g = &gyi[v.pos as usize * h..(v.pos as usize + 1) * h];
            for (((o, a), &gv), &wv) in gws.iter_mut().zip(ac.iter_mut()).zip(g).zip(ws) {
                *o += gv * v.x;
                *a += gv * wv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column of `n_edges` edges into `n_down` features, `vals` at distinct key positions.
    fn case(h: usize, n_edges: usize, n_down: usize, kb: usize) -> (Vec<f32>, Vec<u32>, Vec<BlockValue>) {
        let w = (0..n_edges * h).map(|x| ((x as f32) * 0.37).sin()).collect();
        let downs = (0..n_edges).map(|e| ((e * 7 + 3) % n_down) as u32).collect();
        let vals =
            (0..kb).filter(|p| p % 3 != 1).map(|p| BlockValue { pos: p as u32, x: (p as f32 * 1.3).cos() }).collect();
        (w, downs, vals)
    }

    #[test]
    fn every_variant_matches_the_plain_loops_bit_for_bit() {
        let (kb, n_down) = (8, 11);
        for h in [1, 4, 8, 12, 16] {
            let stride = kb * h;
            let (w, downs, vals) = case(h, 23, n_down, kb);
            let y0: Vec<f32> = (0..n_down * stride).map(|x| (x as f32 * 0.11).cos()).collect();
            let mut want = y0.clone();
            push_plain(h, stride, &w, &downs, &vals, &mut want);
            let mut got = y0.clone();
            push_column(h, stride, &w, &downs, &vals, &mut got);
            assert_eq!(got, want, "push, {h} heads");
            let mut got = y0.clone();
            push_by_heads(h, stride, &w, &downs, &vals, &mut got);
            assert_eq!(got, want, "push (baseline build), {h} heads");
            assert_ne!(want, y0);

            let gy = y0;
            let gw0: Vec<f32> = (0..w.len()).map(|x| (x as f32 * 0.05).sin()).collect();
            let (mut gw_want, mut acc_want) = (gw0.clone(), vec![0.5f32; vals.len() * h]);
            pull_plain(h, stride, &w, &mut gw_want, &downs, &vals, &gy, &mut acc_want);
            let (mut gw, mut acc) = (gw0.clone(), vec![0.5f32; vals.len() * h]);
            pull_column(h, stride, &w, &mut gw, &downs, &vals, &gy, &mut acc);
            assert_eq!((&gw, &acc), (&gw_want, &acc_want), "pull, {h} heads");
            let (mut gw, mut acc) = (gw0.clone(), vec![0.5f32; vals.len() * h]);
            pull_by_heads(h, stride, &w, &mut gw, &downs, &vals, &gy, &mut acc);
            assert_eq!((&gw, &acc), (&gw_want, &acc_want), "pull (baseline build), {h} heads");
            assert_ne!(gw_want, gw0);
        }
    }

    #[test]
    fn plain_loops_match_a_naive_sum() {
        let (h, kb, n_down) = (3, 4, 5);
        let stride = kb * h;
        let (w, downs, vals) = case(h, 9, n_down, kb);
        let mut y = vec![0f32; n_down * stride];
        push_plain(h, stride, &w, &downs, &vals, &mut y);
        for i in 0..n_down {
            for v in &vals {
                for hh in 0..h {
                    let want: f32 =
                        (0..downs.len()).filter(|&e| downs[e] as usize == i).map(|e| w[e * h + hh] * v.x).sum();
                    let got = y[i * stride + v.pos as usize * h + hh];
                    assert!((got - want).abs() < 1e-6, "y[{i}][{}][{hh}]", v.pos);
                }
            }
        }
        let gy: Vec<f32> = (0..n_down * stride).map(|x| (x as f32 * 0.3).sin()).collect();
        let (mut gw, mut acc) = (vec![0f32; w.len()], vec![0f32; vals.len() * h]);
        pull_plain(h, stride, &w, &mut gw, &downs, &vals, &gy, &mut acc);
        for (e, &i) in downs.iter().enumerate() {
            for hh in 0..h {
                let want: f32 = vals.iter().map(|v| gy[i as usize * stride + v.pos as usize * h + hh] * v.x).sum();
                assert!((gw[e * h + hh] - want).abs() < 1e-6);
            }
        }
        for (m, v) in vals.iter().enumerate() {
            for hh in 0..h {
                let want: f32 = downs
                    .iter()
                    .enumerate()
                    .map(|(e, &i)| gy[i as usize * stride + v.pos as usize * h + hh] * w[e * h + hh])
                    .sum();
                assert!((acc[m * h + hh] - want).abs() < 1e-6);
            }
        }
    }
}
