//! Benchmark helper (not a test): the dense-product floor of one finetuning step at a given
//! shape — the GEMMs an exact pruned pass cannot avoid — timed on this machine with the
//! library's own GEMM (the same kernel and threads the engine uses).
//!
//! `gemm_floor D F HEADS LAYERS SEQS CTX [VOCAB]` prints one JSON line: milliseconds and
//! multiply-adds of each product family per step, and their total:
//! - `encoder`: `Z Eᵀ` per module, `N·D·F` (2·LAYERS modules; E read transposed or held
//!   transposed, the faster);
//! - `mixing`: the attention edge terms mixed by the pattern, `N·S·H·F/2` per attention module
//!   with upstream modules (LAYERS − 1 of them);
//! - `weights`: the attention edge weights' factors `E W_Oᵀ` and `W_decᵀ W_V` (`F·D·D` each,
//!   one per attention module and one per (attention module, upstream module) pair), forward
//!   and backward (×2);
//! - `attn_dense`: each attention module's dense input term `mix(X W_V) W_O` with the cached
//!   pattern (`X W_V` and `M W_O`, `N·D·D` each, and per sequence and head `(S, S)·(S, d_h)`,
//!   the whole pattern as the engine multiplies it (its causal half would be 1% of the term
//!   less); LAYERS modules), forward only (its input is the clean run's).
//!
//! Also `forward_ms`, the products of the pruned forward alone (encoder, mixing, the weights
//! once, the dense attention terms): the floor of a value pass; and with VOCAB, `unembed_ms`, one `(N, D) · (D, V)`
//! unembedding of the N tokens (evaluate's floor per batch is `forward_ms + unembed_ms`), and
//! `model_ms`, the model's own products per batch (per layer Q, K, V, O `(N, D)·(D, D)` and the
//! MLP's `(N, D)·(D, 4D)`, `(N, 4D)·(4D, D)`) plus two unembeddings (the clean CE and the
//! zero-ablation CE): collect-acts' floor.
//!
//! Built with `--features scae/openblas` (needs libopenblas-dev), it also times the encoder
//! product and the unembedding with OpenBLAS's `cblas_sgemm` (threads from
//! `OPENBLAS_NUM_THREADS`) and prints them under `"openblas"`, so that the floor is measured
//! with the faster of the two kernels on this machine.
use std::time::Instant;

use rayon::prelude::*;
use scae::util::blas::sgemm;

/// Best of `reps` timings of `f`, in ms.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(feature = "openblas")]
mod openblas {
    #[link(name = "openblas")]
    extern "C" {
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    /// `C (m, n) = A (m, k) · B`, row-major; `B` is `(n, k)` used transposed when `b_t`, else
    /// `(k, n)`.
    pub fn sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], b_t: bool, c: &mut [f32]) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
        let (tb, ldb) = if b_t { (TRANS, k) } else { (NO_TRANS, n) };
        // SAFETY: the lengths are checked above; C does not alias A or B.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                tb,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                b.as_ptr(),
                ldb as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            )
        }
    }
}

/// With the `openblas` feature: the encoder product (per module, times the modules) and the
/// unembedding with OpenBLAS, as a JSON object; otherwise nothing.
#[cfg(feature = "openblas")]
fn openblas_side(n: usize, d: usize, f: usize, modules: usize, vocab: usize) -> String {
    let fill = |len: usize| -> Vec<f32> { (0..len).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect() };
    let (z, e) = (fill(n * d), fill(f * d));
    let mut out = vec![0f32; n * f];
    let enc = best(3, || openblas::sgemm(n, f, d, &z, &e, true, &mut out));
    let unembed = match vocab {
        0 => 0.0,
        v => {
            let w_u = fill(d * v);
            let mut logits = vec![0f32; n * v];
            best(2, || openblas::sgemm(n, v, d, &z, &w_u, false, &mut logits))
        }
    };
    format!(
        ", \"openblas\": {{\"encoder_ms\": {:.1}, \"encoder_gmac_per_s\": {:.1}, \"unembed_ms\": {unembed:.1}}}",
        modules as f64 * enc,
        (n * d * f) as f64 / 1e9 / (enc / 1e3)
    )
}

#[cfg(not(feature = "openblas"))]
fn openblas_side(_: usize, _: usize, _: usize, _: usize, _: usize) -> String {
    String::new()
}

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|x| x.parse().expect("integer argument")).collect();
    let (&[d, f, h, layers, seqs, ctx], vocab) = (a.get(..6).unwrap_or(&[]), a.get(6).copied().unwrap_or(0)) else {
        panic!("usage: gemm_floor D F HEADS LAYERS SEQS CTX [VOCAB]");
    };
    let n = seqs * ctx;
    let fill = |len: usize| -> Vec<f32> { (0..len).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect() };
    // Z (N, D) · Eᵀ, E (F, D): read through strides, or held transposed, `(D, F)` row-major
    // (train-suite's layout; the kernel packs it faster), whichever is faster here.
    let (z, e) = (fill(n * d), fill(f * d));
    let e_t = scae::util::blas::transpose(&e, f, d);
    let mut out = vec![0f32; n * f];
    let enc_ms = best(3, || sgemm(n, f, d, &z, d, 1, &e, 1, d, &mut out, false, true))
        .min(best(3, || sgemm(n, f, d, &z, d, 1, &e_t, f, 1, &mut out, false, true)));
    // Per sequence (S, S·H/2) · (S·H/2, F): the causal mixing's multiply-adds as one product.
    let kk = ctx * h / 2;
    // Sequences in parallel, as the engine runs them.
    let (p, y) = (fill(ctx * kk), fill(kk * f));
    let mut o = vec![0f32; seqs * ctx * f];
    let mix_all_ms =
        best(3, || o.par_chunks_mut(ctx * f).for_each(|ob| sgemm(ctx, f, kk, &p, kk, 1, &y, f, 1, ob, false, false)));
    // (F, D) · (D, D): one weight factor.
    let (ew, wo) = (fill(f * d), fill(d * d));
    let mut ev = vec![0f32; f * d];
    let w_ms = best(3, || sgemm(f, d, d, &ew, d, 1, &wo, d, 1, &mut ev, false, true));
    // mix(X W_V) W_O: (N, D)·(D, D), per sequence and head (S, S)·(S, d_h), (N, D)·(D, D).
    let dh = d / h;
    let (x, wv) = (fill(n * d), fill(d * d));
    let (mut v, mut m) = (vec![0f32; n * d], vec![0f32; n * d]);
    let pat = fill(ctx * ctx);
    let dense_ms = best(3, || {
        sgemm(n, d, d, &x, d, 1, &wv, d, 1, &mut v, false, true);
        m.par_chunks_mut(ctx * d).zip(v.par_chunks(ctx * d)).for_each(|(mb, vb)| {
            let mut out = vec![0f32; ctx * dh];
            for hh in 0..h {
                sgemm(ctx, dh, ctx, &pat, ctx, 1, &vb[hh * dh..], d, 1, &mut out, false, false);
                for q in 0..ctx {
                    mb[q * d + hh * dh..q * d + (hh + 1) * dh].copy_from_slice(&out[q * dh..(q + 1) * dh]);
                }
            }
        });
        // (W_V's buffer stands for W_O: the same shape.)
        sgemm(n, d, d, &m, d, 1, &wv, d, 1, &mut v, false, true);
    });
    let modules = 2 * layers;
    let attn_with_ups = layers.saturating_sub(1);
    // Attention module of layer L: one E W_Oᵀ and one W_decᵀ W_V per upstream module (2L).
    let weight_products: usize = (1..layers).map(|l| 1 + 2 * l).sum();
    let encoder = (modules as f64 * enc_ms, (modules * n * d * f) as f64);
    let mixing = (attn_with_ups as f64 * mix_all_ms, (attn_with_ups * n * kk * f) as f64);
    let weights = ((2 * weight_products) as f64 * w_ms, (2 * weight_products * f * d * d) as f64);
    let dense = (layers as f64 * dense_ms, (layers * (2 * n * d * d + seqs * ctx * ctx * d)) as f64);
    let total_ms = encoder.0 + mixing.0 + weights.0 + dense.0;
    let total_mac = encoder.1 + mixing.1 + weights.1 + dense.1;
    let forward_ms = encoder.0 + mixing.0 + weights.0 / 2.0 + dense.0;
    // (N, D) · (D, V), W_U as the model stores it.
    let unembed_ms = match vocab {
        0 => 0.0,
        v => {
            let (x, w_u) = (fill(n * d), fill(d * v));
            let mut logits = vec![0f32; n * v];
            best(2, || sgemm(n, v, d, &x, d, 1, &w_u, v, 1, &mut logits, false, true))
        }
    };
    let model_ms = match vocab {
        0 => 0.0,
        _ => {
            let (x, wdd, wd4, w4d) = (fill(n * d), fill(d * d), fill(d * 4 * d), fill(4 * d * d));
            let (mut o, mut h4) = (vec![0f32; n * d], vec![0f32; n * 4 * d]);
            let dd = best(2, || sgemm(n, d, d, &x, d, 1, &wdd, d, 1, &mut o, false, true));
            let up = best(2, || sgemm(n, 4 * d, d, &x, d, 1, &wd4, 4 * d, 1, &mut h4, false, true));
            let down = best(2, || sgemm(n, d, 4 * d, &h4, 4 * d, 1, &w4d, d, 1, &mut o, false, true));
            layers as f64 * (4.0 * dd + up + down) + 2.0 * unembed_ms
        }
    };
    println!(
        "{{\"encoder_ms\": {:.1}, \"encoder_gmac\": {:.2}, \"mixing_ms\": {:.1}, \"mixing_gmac\": {:.2}, \"weights_ms\": {:.1}, \"weights_gmac\": {:.2}, \"attn_dense_ms\": {:.1}, \"attn_dense_gmac\": {:.2}, \"total_ms\": {total_ms:.1}, \"total_gmac\": {:.2}, \"gmac_per_s\": {:.1}, \"forward_ms\": {forward_ms:.1}, \"unembed_ms\": {unembed_ms:.1}, \"unembed_gmac\": {:.2}, \"model_ms\": {model_ms:.1}, \"encoder_gmac_per_s\": {:.1}{}}}",
        encoder.0,
        encoder.1 / 1e9,
        mixing.0,
        mixing.1 / 1e9,
        weights.0,
        weights.1 / 1e9,
        dense.0,
        dense.1 / 1e9,
        total_mac / 1e9,
        total_mac / 1e9 / (total_ms / 1e3),
        (n * d * vocab) as f64 / 1e9,
        encoder.1 / 1e9 / (encoder.0 / 1e3),
        openblas_side(n, d, f, modules, vocab)
    );
}
