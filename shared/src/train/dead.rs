//! Dead-feature counters (docs/MATH.md, "Dead features"): tokens since each feature last had a
//! non-zero value, counted in every loss mode.

/// Tokens since each feature last fired, per module.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadTracker {
    pub since: Vec<Vec<u64>>,
    pub threshold: u64,
}

impl DeadTracker {
    /// Counters for `n_modules` modules of `n_features`.
    pub fn new(n_modules: usize, n_features: usize, threshold: u64) -> DeadTracker {
        DeadTracker { since: vec![vec![0; n_features]; n_modules], threshold }
    }

    /// Add a batch of `n_tokens` in which the features marked in `fired` had a non-zero value.
    pub fn update(&mut self, module: usize, n_tokens: u64, fired: &[bool]) {
        for (s, &f) in self.since[module].iter_mut().zip(fired) {
            *s = if f { 0 } else { *s + n_tokens };
        }
    }

    /// Features of `module` dead now (`since > threshold`).
    pub fn dead(&self, module: usize) -> Vec<bool> {
        self.since[module].iter().map(|&s| s > self.threshold).collect()
    }

    /// Number of dead features of `module`.
    pub fn n_dead(&self, module: usize) -> usize {
        self.since[module].iter().filter(|&&s| s > self.threshold).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_is_dead_after_more_than_threshold_tokens_without_firing() {
        let mut t = DeadTracker::new(1, 3, 10);
        t.update(0, 6, &[true, false, false]);
        t.update(0, 6, &[false, true, false]);
        // since = [6, 0, 12]: only the feature silent for 12 > 10 tokens is dead
        assert_eq!(t.since[0], [6, 0, 12]);
        assert_eq!(t.dead(0), [false, false, true]);
        assert_eq!(t.n_dead(0), 1);
        t.update(0, 6, &[false, false, true]);
        assert_eq!(t.dead(0), [true, false, false]);
    }
}
