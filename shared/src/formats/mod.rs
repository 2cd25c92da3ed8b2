//! Every handoff file between the stages, read, checked and written in one place each
//! (layouts in `shared/FORMATS.md`): activation caches ([`cache`]), suites ([`suite`]),
//! connection and edge sets ([`connections`]), training checkpoints ([`checkpoint`]),
//! `eval.json` ([`eval`]) and `scores.json` ([`scores`]).

pub mod cache;
pub mod checkpoint;
pub mod connections;
pub mod eval;
pub mod scores;
pub mod suite;
