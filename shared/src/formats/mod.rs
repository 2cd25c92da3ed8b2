//! Every handoff file between the stages, read, checked and written in one place each
//! (layouts in `shared/FORMATS.md`): activation caches ([`cache`]), suites ([`suite`], their [`lineage`]),
//! connection and edge sets ([`connections`], their parquet metadata [`edges_meta`]),
//! `eval.json` ([`eval_json`]) and `scores.json` ([`scores_json`]), a training run's configuration as
//! checkpoints and suites record it ([`runconfig`]); the Python reference's own files
//! ([`reference`], over PyTorch's formats in [`torch`]); the SAELens export ([`saelens`]).
//! Training checkpoints are internal to
//! a run, not a handoff: they live with the runners (`train::checkpoints`).

pub mod cache;
pub mod connections;
pub mod edges_meta;
pub mod eval_json;
pub mod lineage;
pub mod reference;
pub mod runconfig;
pub mod saelens;
pub mod scores_json;
pub mod suite;
pub mod torch;
