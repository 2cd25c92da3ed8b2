//! Sparse kernels of the pruned pass, as candle custom ops with hand-written backward passes.
//!
//! - [`EdgeMatmul`]: `Y[b,h,s,i] = Σ_c w[i,c,h] · X[b·S+s, col(i,c)]` — every downstream
//!   feature `i` reads only its `C` connected columns of the concatenated upstream features
//!   `X (N, M)`. Work is driven by X's non-zeros through a reverse adjacency (column -> edge
//!   slots), so it costs (active upstream features × fan-out × heads), never `F × M`.
//! - [`SparseDecode`]: `R = f · W_decᵀ` touching only the non-zero features (k per row).
//!
//! The backward passes return the gradient with respect to X (or f) **only at X's non-zero
//! entries** (zero elsewhere). That is exact for the pruned pass, where X are ReLU'd top-k
//! features whose zero entries pass no gradient upstream.
//!
//! Dimensions: B sequences of S positions, N = B·S tokens, H heads (1 for mlp targets), F
//! downstream features, C slots each, M = |U|·F concatenated upstream columns, D = d_model.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::plan::EdgeIndex;
use rayon::prelude::*;

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("sparse ops need f32 tensors") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("sparse ops need contiguous tensors") };
    Ok(&v[a..b])
}

fn tensor_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// `Y (B, H, S, F) = edges(X (N, M), w (F, C, H))`; see the module docs.
#[derive(Debug, Clone)]
pub struct EdgeMatmul {
    pub index: Arc<EdgeIndex>,
    pub heads: usize,
    pub seq_len: usize,
}

impl CustomOp2 for EdgeMatmul {
    fn name(&self) -> &'static str {
        "edge-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let ix = &self.index;
        let (m_cols, f, h, s) = (ix.n_cols, ix.n_down, self.heads, self.seq_len);
        let n = l1.shape().dims()[0];
        if l1.shape().dims() != [n, m_cols] || w.len() != f * ix.width * h || n % s != 0 {
            candle_core::bail!("edge-matmul: shapes X {:?}, w {:?} do not fit the index", l1.shape(), l2.shape());
        }
        let b = n / s;
        let mut out = vec![0f32; b * h * s * f];
        out.par_chunks_mut(h * s * f).enumerate().for_each(|(bi, yb)| {
            for si in 0..s {
                let row = &x[(bi * s + si) * m_cols..(bi * s + si + 1) * m_cols];
                for (m, &xv) in row.iter().enumerate() {
                    if xv == 0.0 {
                        continue;
                    }
                    for (slot, i) in ix.edges(m) {
                        let ws = &w[slot * h..(slot + 1) * h];
                        for (hi, &wv) in ws.iter().enumerate() {
                            yb[(hi * s + si) * f + i] += wv * xv;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, s, f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, gv) = (tensor_vec(x)?, tensor_vec(w)?, tensor_vec(grad)?);
        let ix = &self.index;
        let (m_cols, f, h, s) = (ix.n_cols, ix.n_down, self.heads, self.seq_len);
        let n = x.dim(0)?;
        let mut gx = vec![0f32; n * m_cols];
        let gw = gx
            .par_chunks_mut(s * m_cols)
            .enumerate()
            .fold(
                || vec![0f32; wv.len()],
                |mut gw, (bi, gxb)| {
                    let gyb = &gv[bi * h * s * f..(bi + 1) * h * s * f];
                    for si in 0..s {
                        let row = &xv[(bi * s + si) * m_cols..(bi * s + si + 1) * m_cols];
                        for (m, &xval) in row.iter().enumerate() {
                            if xval == 0.0 {
                                continue;
                            }
                            let mut acc = 0f32;
                            for (slot, i) in ix.edges(m) {
                                for hi in 0..h {
                                    let g = gyb[(hi * s + si) * f + i];
                                    acc += g * wv[slot * h + hi];
                                    gw[slot * h + hi] += g * xval;
                                }
                            }
                            gxb[si * m_cols + m] = acc;
                        }
                    }
                    gw
                },
            )
            .reduce(
                || vec![0f32; wv.len()],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let dev = x.device();
        Ok((Some(Tensor::from_vec(gx, x.shape(), dev)?), Some(Tensor::from_vec(gw, w.shape(), dev)?)))
    }
}

/// `R (N, D) = f (N, F) · W_decᵀ`, given `w_dec_t = W_decᵀ (F, D)`; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct SparseDecode;

impl CustomOp2 for SparseDecode {
    fn name(&self) -> &'static str {
        "sparse-decode"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (f, wt) = (slice(s1, l1)?, slice(s2, l2)?);
        let (n, nf) = l1.shape().dims2()?;
        let (nf2, d) = l2.shape().dims2()?;
        if nf != nf2 {
            candle_core::bail!("sparse-decode: {nf} features but W_decᵀ has {nf2} rows");
        }
        let mut out = vec![0f32; n * d];
        out.par_chunks_mut(d).enumerate().for_each(|(t, r)| {
            for (i, &fv) in f[t * nf..(t + 1) * nf].iter().enumerate() {
                if fv != 0.0 {
                    r.iter_mut().zip(&wt[i * d..(i + 1) * d]).for_each(|(o, w)| *o += fv * w);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        f: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (fv, wv, gv) = (tensor_vec(f)?, tensor_vec(wt)?, tensor_vec(grad)?);
        let (n, nf) = f.dims2()?;
        let d = wt.dim(1)?;
        let mut gf = vec![0f32; n * nf];
        let gw = gf
            .par_chunks_mut(nf)
            .enumerate()
            .fold(
                || vec![0f32; nf * d],
                |mut gw, (t, gfr)| {
                    let g = &gv[t * d..(t + 1) * d];
                    for (i, &x) in fv[t * nf..(t + 1) * nf].iter().enumerate() {
                        if x != 0.0 {
                            let w = &wv[i * d..(i + 1) * d];
                            gfr[i] = g.iter().zip(w).map(|(a, b)| a * b).sum();
                            gw[i * d..(i + 1) * d].iter_mut().zip(g).for_each(|(o, gg)| *o += x * gg);
                        }
                    }
                    gw
                },
            )
            .reduce(
                || vec![0f32; nf * d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let dev = f.device();
        Ok((Some(Tensor::from_vec(gf, f.shape(), dev)?), Some(Tensor::from_vec(gw, wt.shape(), dev)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn edge_matmul_matches_dense_masked_product() {
        let dev = Device::Cpu;
        let (b, s, m, f, c, h) = (2, 3, 5, 4, 2, 2);
        let cols = vec![vec![0, 3], vec![4], vec![], vec![1, 0]];
        let index = Arc::new(EdgeIndex::new(&cols, c, m));
        // X with zeros (sparse features).
        let xs: Vec<f32> = (0..b * s * m).map(|i| if i % 3 == 0 { 0.0 } else { (i as f32 * 0.37).sin() }).collect();
        let x = Var::from_vec(xs.clone(), (b * s, m), &dev).unwrap();
        let ws: Vec<f32> = (0..f * c * h).map(|i| (i as f32 * 0.71).cos()).collect();
        let w = Var::from_vec(ws.clone(), (f, c, h), &dev).unwrap();
        let op = EdgeMatmul { index: index.clone(), heads: h, seq_len: s };
        let y = x.as_tensor().apply_op2(w.as_tensor(), op).unwrap();
        // Dense oracle: Wd[h, i, m] = Σ_c w[i,c,h] [cols(i,c) == m]
        let mut y_ref = vec![0f32; b * h * s * f];
        for bi in 0..b {
            for si in 0..s {
                for (i, cs) in cols.iter().enumerate() {
                    for (ci, &mm) in cs.iter().enumerate() {
                        for hi in 0..h {
                            y_ref[((bi * h + hi) * s + si) * f + i] +=
                                ws[(i * c + ci) * h + hi] * xs[(bi * s + si) * m + mm as usize];
                        }
                    }
                }
            }
        }
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, r) in got.iter().zip(&y_ref) {
            assert!((g - r).abs() < 1e-6, "{g} vs {r}");
        }
        // Gradients of L = Σ Y·G against finite differences of the oracle (linear: exact).
        let gsel: Vec<f32> = (0..b * h * s * f).map(|i| (i as f32 * 0.13).sin()).collect();
        let gt = Tensor::from_vec(gsel.clone(), (b, h, s, f), &dev).unwrap();
        let loss = (y * gt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gw = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, cs) in cols.iter().enumerate() {
            for (ci, &mm) in cs.iter().enumerate() {
                for hi in 0..h {
                    let mut want = 0f32;
                    for bi in 0..b {
                        for si in 0..s {
                            want += gsel[((bi * h + hi) * s + si) * f + i] * xs[(bi * s + si) * m + mm as usize];
                        }
                    }
                    assert!((gw[(i * c + ci) * h + hi] - want).abs() < 1e-5);
                }
            }
        }
        for t in 0..b * s {
            let (bi, si) = (t / s, t % s);
            for mm in 0..m {
                let mut want = 0f32;
                for (i, cs) in cols.iter().enumerate() {
                    for (ci, &col) in cs.iter().enumerate() {
                        if col as usize == mm {
                            for hi in 0..h {
                                want += gsel[((bi * h + hi) * s + si) * f + i] * ws[(i * c + ci) * h + hi];
                            }
                        }
                    }
                }
                let want = if xs[t * m + mm] == 0.0 { 0.0 } else { want };
                assert!((gx[t * m + mm] - want).abs() < 1e-5, "gx[{t},{mm}]");
            }
        }
    }

    #[test]
    fn sparse_decode_matches_matmul_with_gradients() {
        let dev = Device::Cpu;
        let (n, f, d) = (4, 6, 3);
        let fs: Vec<f32> = (0..n * f).map(|i| if i % 2 == 0 { 0.0 } else { i as f32 * 0.1 }).collect();
        let fv = Var::from_vec(fs, (n, f), &dev).unwrap();
        let wv = Var::from_vec((0..f * d).map(|i| (i as f32).sin()).collect::<Vec<_>>(), (f, d), &dev).unwrap();
        let got = fv.as_tensor().apply_op2(wv.as_tensor(), SparseDecode).unwrap();
        let want = fv.as_tensor().matmul(wv.as_tensor()).unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6);
        let g = Tensor::from_vec((0..n * d).map(|i| (i as f32).cos()).collect::<Vec<_>>(), (n, d), &dev).unwrap();
        let ga = (got * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dw = (ga.get(wv.as_tensor()).unwrap() - gb.get(wv.as_tensor()).unwrap()).unwrap();
        assert!(dw.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        // gradient w.r.t. f agrees at the non-zeros (and is zero elsewhere by contract)
        let gfa = ga.get(fv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gfb = gb.get(fv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n * f {
            let want = if i % 2 == 0 { 0.0 } else { gfb[i] };
            assert!((gfa[i] - want).abs() < 1e-5);
        }
    }
}
