//! A sequence's active features, as attribution reads them: the nonzero values only, so that
//! a graph costs what its nodes cost, not a scan of every feature at every position.

use crate::error::Result;
use crate::pass::PassOutput;
use crate::util::to_vec;

/// Per module, the sequence's nonzero feature values as (position, feature, value), by
/// position, then feature.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqFeats {
    pub(super) modules: Vec<Vec<(u32, u32, f32)>>,
}

impl SeqFeats {
    /// From a pass output of one sequence: its `(S, F)` features per module.
    pub fn of_output(out: &PassOutput) -> Result<SeqFeats> {
        let modules = out
            .feats
            .iter()
            .map(|t| {
                let f = t.dim(1)?;
                let v = to_vec(t)?;
                Ok(Self::nonzero(v.iter().enumerate().map(|(c, &a)| (c as u32, a)), f))
            })
            .collect::<Result<_>>()?;
        Ok(SeqFeats { modules })
    }

    /// From each module's values of one sequence by place `position·F + feature` (strictly
    /// ascending, zeros may be left out), `f` features per position.
    pub fn of_flat(values: &[Vec<(u32, f32)>], f: usize) -> SeqFeats {
        // (Attribution reads each feature's places in this order.)
        debug_assert!(values.iter().all(|v| v.windows(2).all(|w| w[0].0 < w[1].0)), "places must ascend");
        SeqFeats { modules: values.iter().map(|v| Self::nonzero(v.iter().copied(), f)).collect() }
    }

    fn nonzero(values: impl Iterator<Item = (u32, f32)>, f: usize) -> Vec<(u32, u32, f32)> {
        let f = f as u32;
        values.filter(|&(_, a)| a != 0.0).map(|(c, a)| (c / f, c % f, a)).collect()
    }

    /// The features active anywhere in module `m`'s values, ascending.
    pub(super) fn active(&self, m: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = self.modules[m].iter().map(|&(_, j, _)| j).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn dense_and_flat_give_the_same_nonzero_values_in_order() {
        let (s, f) = (3, 4);
        let dense = vec![0.0, 1.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, -0.0, 0.25, 0.0f32];
        let t = Tensor::from_vec(dense.clone(), (s, f), &Device::Cpu).unwrap();
        let out = PassOutput { feats: vec![t.clone(), t], recon: Vec::new(), pre: Vec::new() };
        let a = SeqFeats::of_output(&out).unwrap();
        let want = vec![(0, 1, 1.5), (0, 3, 2.0), (2, 0, 3.0), (2, 2, 0.25)];
        assert_eq!(a.modules, vec![want.clone(), want]);
        // The browser's kept values: places of the nonzero values (a zero among them is skipped).
        let flat: Vec<(u32, f32)> =
            dense.iter().enumerate().filter(|(c, &x)| x != 0.0 || *c == 4).map(|(c, &x)| (c as u32, x)).collect();
        assert_eq!(SeqFeats::of_flat(&[flat.clone(), flat], f), a);
        assert_eq!(a.active(0), vec![0, 1, 2, 3]);
    }
}
