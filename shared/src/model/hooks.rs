//! The points of the model a suite reads and writes: its modules (`attn_L` reconstructs
//! `blocks.L.hook_attn_out`, `mlp_L` transcodes `ln2.hook_normalized` into
//! `blocks.L.hook_mlp_out`), their order and precedence (docs/MATH.md, "TopK autoencoder").

/// The kind of a module: which hook it reconstructs and which LN scale it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Attn,
    Mlp,
}

/// A module of the suite, e.g. `attn_3` or `mlp_0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Module {
    pub layer: usize,
    pub kind: Kind,
}

impl Module {
    /// Every module of an `n_layers` model in suite order.
    pub fn all(n_layers: usize) -> Vec<Module> {
        (0..n_layers)
            .flat_map(|l| [Module { layer: l, kind: Kind::Attn }, Module { layer: l, kind: Kind::Mlp }])
            .collect()
    }

    /// `attn_L` / `mlp_L`.
    pub fn name(&self) -> String {
        match self.kind {
            Kind::Attn => format!("attn_{}", self.layer),
            Kind::Mlp => format!("mlp_{}", self.layer),
        }
    }

    /// Parse `attn_L` / `mlp_L`.
    pub fn parse(s: &str) -> Option<Module> {
        let (kind, layer) = s.split_once('_')?;
        let kind = match kind {
            "attn" => Kind::Attn,
            "mlp" => Kind::Mlp,
            _ => return None,
        };
        Some(Module { layer: layer.parse().ok()?, kind })
    }

    /// Position in suite order.
    pub fn index(&self) -> usize {
        2 * self.layer + usize::from(self.kind == Kind::Mlp)
    }

    /// Whether `self` feeds `down` in the pruned pass. Sequential blocks: earlier layers, and
    /// attn_L -> mlp_L. Parallel blocks (GPT-NeoX): earlier layers only (docs/MATH.md, "TopK autoencoder").
    pub fn precedes(&self, down: &Module, parallel: bool) -> bool {
        self.layer < down.layer
            || (!parallel && self.layer == down.layer && self.kind == Kind::Attn && down.kind == Kind::Mlp)
    }
}

/// A module's layer index in an attribution graph: attn_L → 2L, mlp_L → 2L + 1.
pub fn graph_layer(m: &Module) -> u64 {
    2 * m.layer as u64 + u64::from(m.kind == Kind::Mlp)
}

/// The graph's number of feature `f` of a module on graph layer `layer` (Cantor pairing).
pub fn graph_feature(layer: u64, f: u64) -> u64 {
    (layer + f) * (layer + f + 1) / 2 + f
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_precedence() {
        let m = Module::all(2);
        let names: Vec<String> = m.iter().map(Module::name).collect();
        assert_eq!(names, ["attn_0", "mlp_0", "attn_1", "mlp_1"]);
        assert_eq!(Module::parse("mlp_1"), Some(m[3]));
        assert_eq!(Module::parse("mlp_x"), None);
        // sequential: attn_0 -> mlp_0 allowed; parallel: not.
        assert!(m[0].precedes(&m[1], false));
        assert!(!m[0].precedes(&m[1], true));
        assert!(m[1].precedes(&m[2], true));
        assert!(!m[2].precedes(&m[1], false));
        assert!(!m[1].precedes(&m[1], false));
    }
}
