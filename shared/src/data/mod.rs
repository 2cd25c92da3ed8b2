//! Documents -> token rows -> batches: reading text and token files ([`docs`]), turning them
//! into batches of `ctx_len`-token rows for the model ([`source`]), and the batch of cached
//! clean-run tensors every pass reads ([`batch`]).

pub mod batch;
pub mod docs;
pub mod source;

pub use batch::{Batch, FlatBatch, CLEAN_CE, ZERO_CE};
pub use docs::{Doc, DocStream, SequenceOptions, SequenceStats, Sequencer};
pub use source::{BatchSource, SourceSpec};
