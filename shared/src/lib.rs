//! scae: Sparsely Connected Autoencoder suites in Rust — the library behind the pipeline tools
//! (`collect-acts`, `train-suite`, `score-edges`, `select-edges`, `finetune`, `evaluate`,
//! `view-features`, `convert-suite`).
//!
//! The crate follows the pipeline, each group using only the ones before it (checked by
//! `shared/tests/layering.rs`):
//! - [`error`]: the error type; [`util`]: atomic output, parquet tables, dense kernels, a
//!   seeded generator, progress and interrupts (no SCAE concepts);
//! - [`model`]: the language model with TransformerLens-exact hooks, the suite's modules, hub
//!   lookup and tokenizing;
//! - [`data`]: documents -> token rows -> batches of cached clean-run tensors;
//! - [`sae`]: the TopK autoencoder — parameters, top-k, FVU and AuxK, decoder normalisation,
//!   initialisation, the pretraining step;
//! - [`formats`]: every handoff file (caches and the collect runner, suites, connections and
//!   their metadata, eval.json, scores.json, the reference's files), read, checked and written;
//! - [`inputs`]: opening a stage's inputs (hub ids included) and cross-checking them; which
//!   connections a pass runs with;
//! - [`pass`]: the pruned forward pass (autograd, the CPU engine, kernels) and its losses;
//! - [`train`]: the pretraining and finetuning runners, the finetuning step's forms, the
//!   checkpoints;
//! - [`scores`] (edge scores, top-C selection, their runners), [`eval`] (the evaluation
//!   runner), [`browse`] (the feature browser's runner);
//! - [`cli`]: command-line argument groups and the `main` wrapper (nothing else imports it).
//!
//! Every formula is stated in `docs/MATH.md`; `docs/ARCHITECTURE.md` lists the file that
//! implements each; file layouts are in `shared/FORMATS.md`.

pub mod attrib;
pub mod browse;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod inputs;
pub mod model;
pub mod pass;
pub mod sae;
pub mod scores;
pub mod train;
pub mod util;

pub use data::{Batch, FlatBatch};
pub use error::{Error, Result};
pub use formats::cache::Cache;
pub use formats::connections::{Connections, Edge};
pub use formats::suite::Suite;
pub use inputs::Inputs;
pub use model::{Kind, Model, Module, Runtime};
pub use pass::{PassOptions, PassOutput, Plan, Wiring};
pub use sae::AeParams;
pub use scores::ScoreStats;
pub use train::StepReport;
