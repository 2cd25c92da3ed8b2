//! A subset of a module's active features, for products over only the rows a computation
//! reads (`attribute_nodes` with wanted nodes).

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::Result;

/// Some of a module's active features (ascending), and their rows among them.
pub(super) struct Subset {
    pub(super) ids: Vec<u32>,
    /// Their rows in the module's active features.
    rows: Vec<u32>,
    /// Feature -> its row in the subset.
    pub(super) row_of: HashMap<u32, usize>,
}

impl Subset {
    /// The features of `ids` that are active (`active_row`), each once, ascending.
    pub(super) fn of(ids: impl Iterator<Item = u32>, active_row: &HashMap<u32, usize>) -> Subset {
        let set: std::collections::BTreeSet<u32> = ids.filter(|j| active_row.contains_key(j)).collect();
        let ids: Vec<u32> = set.into_iter().collect();
        let rows = ids.iter().map(|j| active_row[j] as u32).collect();
        let row_of = ids.iter().enumerate().map(|(r, &j)| (j, r)).collect();
        Subset { ids, rows, row_of }
    }

    /// The subset's rows of `t` (the module's active features' rows).
    pub(super) fn select(&self, t: &Tensor) -> Result<Tensor> {
        let idx = Tensor::new(self.rows.as_slice(), t.device())?;
        Ok(t.index_select(&idx, 0)?.contiguous()?)
    }
}
