//! The learning-rate schedule (docs/MATH.md, "Optimizer and clipping").

/// The reference's LambdaLR factor for step `t` (0-based): linear warmup to `warmup·steps`,
/// constant until `decay_start·steps`, then linear to 0 at `steps`.
pub fn lr_factor(t: u64, steps: u64, warmup: f64, decay_start: f64) -> f64 {
    let w = warmup * steps as f64;
    let dc = decay_start * steps as f64;
    let t = t as f64;
    if t < w {
        t / w
    } else if t < dc {
        1.0
    } else {
        ((steps as f64 - t) / (steps as f64 - dc)).max(0.0)
    }
}

/// `base / sqrt(F / 2^14)`: the reference's feature-count scaling of the learning rate.
pub fn scaled_lr(base: f64, n_features: usize) -> f64 {
    base / (n_features as f64 / 16384.0).sqrt()
}

/// `stagger_steps`: module m's loss term counts only from step `(2·layer + [0 attn, 1 mlp]) · N`
/// (the reference's `scale(name, step)`); 1 or 0.
pub fn stagger_scale(module: crate::model::Module, step: u64, stagger: Option<u64>) -> f32 {
    let order = 2 * module.layer as u64 + u64::from(module.kind == crate::model::Kind::Mlp);
    match stagger {
        Some(n) if step < order * n => 0.0,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_reference_lambda() {
        // python: [lr_fn(t) for t in (0, 5, 10, 79, 80, 90, 99)] with steps=100, warm=0.1, decay=0.8
        let f = |t| lr_factor(t, 100, 0.1, 0.8);
        assert_eq!(f(0), 0.0);
        assert!((f(5) - 0.5).abs() < 1e-12);
        assert_eq!(f(10), 1.0);
        assert_eq!(f(79), 1.0);
        assert!((f(80) - 1.0).abs() < 1e-12);
        assert!((f(90) - 0.5).abs() < 1e-12);
        assert!((f(99) - 0.05).abs() < 1e-12);
        assert!((scaled_lr(1e-3, 3072) - 1e-3 * 2.309401).abs() < 1e-8);
    }

    #[test]
    fn stagger_introduces_modules_in_suite_order() {
        use crate::model::Module;
        let m = Module::all(2); // attn_0, mlp_0, attn_1, mlp_1: orders 0, 1, 2, 3
        let on = |step| m.iter().map(|&x| stagger_scale(x, step, Some(10))).collect::<Vec<_>>();
        assert_eq!(on(0), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(on(10), [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(on(29), [1.0, 1.0, 1.0, 0.0]);
        assert_eq!(on(30), [1.0, 1.0, 1.0, 1.0]);
        assert!(m.iter().all(|&x| stagger_scale(x, 0, None) == 1.0));
    }
}
