//! scae: Sparsely Connected Autoencoder suites in Rust.
//!
//! The library behind the pipeline tools (`collect-acts`, ...): the language model runtime
//! with TransformerLens-exact hook values ([`model`]), text and token sources ([`data`]),
//! activation caches ([`cache`]), and the helpers every tool shares ([`cli`], [`io`]).
//! File formats are documented in `shared/FORMATS.md`.

pub mod cache;
pub mod cli;
pub mod collect;
pub mod connections;
pub mod data;
pub mod dense_oracle;
pub mod devtrain;
pub mod engine;
pub mod error;
pub mod hub;
pub mod inputs;
pub mod io;
pub mod model;
pub mod pruned;
pub mod sae;
pub mod scores;
pub mod sparse_ops;
pub mod stream;
pub mod suite;
pub mod table;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
