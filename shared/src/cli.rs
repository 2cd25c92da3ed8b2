//! Pieces every tool's command line shares: `--device`, `--seed`, `--threads`, the cache
//! dtype, and the `main` wrapper that prints one error line and picks the exit code.

use anyhow::Context;
use std::process::ExitCode;

use candle_core::{DType, Device};

/// Options every compute tool accepts (flatten into the tool's args with `#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Common {
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device_name)]
    pub device: String,
    /// Random seed for everything that draws numbers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads, 1 to 1024 (default: all cores; `RAYON_NUM_THREADS` also works). Results do
    /// not depend on it.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    #[serde(skip)]
    pub threads: Option<usize>,
}

impl Common {
    /// Apply `--threads` and open `--device`.
    pub fn setup(&self) -> crate::error::Result<Device> {
        if let Some(n) = self.threads {
            // Both candle's GEMM and rayon read this before their first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        open_device(&self.device)
    }
}

fn parse_device_name(s: &str) -> Result<String, String> {
    let ok = s == "cpu" || s == "cuda" || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("expected cpu, cuda or cuda:N, found `{s}`"))
    }
}

/// Open a device by name (`cpu`, `cuda`, `cuda:N`). Plain `cuda` in one of several ranks of a
/// job is the GPU of the rank's place on its node ([`crate::util::collective::local_gpu`]).
pub fn open_device(name: &str) -> crate::error::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda:") {
        Some(n) => n.parse().unwrap_or(0),
        None => crate::util::collective::local_gpu(|v| std::env::var(v).ok()),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(crate::error::Error::Usage(format!(
            "--device {name}: this binary was built without CUDA; hint: build it with scripts/build-cuda.sh"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| crate::error::Error::Usage(format!("--device {name}: cannot open GPU: {e}")))
}

/// Run a tool's body: print `tool: <error chain>` on failure and exit 1; exit 0 quietly when
/// stdout was closed early (a broken pipe, e.g. `| head`). The tool runs as one process: under
/// mpirun/srun -n N > 1 it refuses before any work.
pub fn run_main(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    crate::util::mem::keep_freed_memory();
    let body = || -> anyhow::Result<()> {
        crate::util::collective::require_one_process(tool)?;
        body()
    };
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_for(tool, &e),
    }
}

/// [`run_main`] for a tool that runs on every rank of its job (`mpirun -n N tool ...`): the
/// body gets the job's collective. Rank 0 speaks for the job (notes and progress; the other
/// ranks are quiet), and an error on any rank is printed, prefixed with the rank when the job
/// has several, and ends the whole job, so no rank is left waiting for a failed one.
pub fn run_main_ranks(
    tool: &str,
    body: impl FnOnce(&dyn crate::util::collective::Collective) -> anyhow::Result<()>,
) -> ExitCode {
    crate::util::mem::keep_freed_memory();
    let coll = match crate::util::collective::init() {
        Ok(c) => c,
        Err(e) => return exit_for(tool, &anyhow::Error::from(e)),
    };
    let (rank, size) = (coll.rank(), coll.size());
    crate::util::set_quiet(rank > 0);
    match body(coll.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if size > 1 => {
            crate::util::set_quiet(false);
            let code = exit_for(&format!("{tool} (rank {rank} of {size})"), &e);
            // 130 (interrupted) and 1 (failed) stay the job's status.
            let status = if code == ExitCode::from(130) { 130 } else { 1 };
            coll.abort(status)
        }
        Err(e) => exit_for(tool, &e),
    }
}

/// Print a failed tool's error as one line and pick its exit code (see [`run_main`]).
fn exit_for(tool: &str, e: &anyhow::Error) -> ExitCode {
    let is_pipe = |io: &std::io::Error| io.kind() == std::io::ErrorKind::BrokenPipe;
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(is_pipe)
            || matches!(c.downcast_ref::<crate::error::Error>(), Some(crate::error::Error::Io { err, .. }) if is_pipe(err))
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    if let Some(crate::error::Error::Interrupted(msg)) = e.chain().find_map(|c| c.downcast_ref::<crate::error::Error>())
    {
        crate::note!("{tool}: {msg}");
        return ExitCode::from(130);
    }
    // One line: each cause's first line (candle appends a backtrace on later lines when
    // RUST_BACKTRACE is set).
    let causes: Vec<String> = e
        .chain()
        .filter_map(|c| c.to_string().lines().next().map(|l| l.trim().to_string()))
        .filter(|l| !l.is_empty())
        .collect();
    crate::note!("{tool}: {}", causes.join(": "));
    ExitCode::from(1)
}

/// Parse a tool's arguments like `A::parse()`, adding a hint where a flag was mistaken for a
/// similar one: `--tokens N` (a file of token ids) for the token budget `--n-tokens N`.
pub fn parse_args<A: clap::Parser>() -> A {
    A::try_parse().unwrap_or_else(|e| {
        let argv: Vec<String> = std::env::args().collect();
        let numeric_tokens =
            argv.windows(2).any(|w| w[0] == "--tokens" && !w[1].is_empty() && w[1].chars().all(|c| c.is_ascii_digit()));
        if numeric_tokens && e.use_stderr() {
            let _ = e.print();
            crate::note!(
                "hint: --tokens names a file of pre-tokenized data; the number of tokens to train on is --n-tokens"
            );
            std::process::exit(2);
        }
        e.exit()
    })
}

/// The flags of a training tool's command `cmd` that its run configuration (`args` serialised:
/// what `--resume` compares, [`crate::formats::runconfig::RunConfig`]) misses, and the flags it
/// holds that cannot change a run. Both must be empty: every flag is part of the run unless it
/// is one of the few that cannot change the result (marked `#[serde(skip)]`).
pub fn run_config_mismatches(cmd: &clap::Command, args: &impl serde::Serialize) -> Vec<String> {
    const NOT_RUN: [&str; 9] = [
        "--shard-modules",
        "--out",
        "--resume",
        "--overwrite",
        "--halt-after",
        "--checkpoint-every",
        "--threads",
        "--steps",
        "--n-tokens",
    ];
    let v = serde_json::to_value(args).expect("arguments serialize");
    let keys: Vec<String> =
        v.as_object().map_or(Vec::new(), |m| m.keys().map(|k| crate::formats::runconfig::flag_name(k)).collect());
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("--{long}");
        match (keys.contains(&flag), NOT_RUN.contains(&flag.as_str())) {
            (false, false) => out.push(format!("{flag} is missing from the run configuration")),
            (true, true) => out.push(format!("{flag} cannot change a run but is part of its configuration")),
            _ => {}
        }
    }
    out
}

/// `say!(...)`: [`say`] with `println!`'s arguments (a line on stdout); returns the write's result.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::say(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes a tool's result text to stdout (no newline added). A closed pipe (`tool | head -0`)
/// comes back as a broken-pipe error, which [`run_main`] turns into a quiet exit 0; any other
/// failure (`> /dev/full`) is an error naming stdout.
pub fn say(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    write!(out, "{text}").and_then(|()| out.flush()).context("writing to stdout")
}

/// Value parser of a finite number > 0 (learning rates).
pub fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    finite_f64(s, "> 0", |v| v > 0.0)
}

/// Value parser of a finite number >= 0 (loss weights).
pub fn non_negative_f64(s: &str) -> std::result::Result<f64, String> {
    finite_f64(s, ">= 0", |v| v >= 0.0)
}

fn finite_f64(s: &str, bound: &str, ok: fn(f64) -> bool) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && ok(v) => Ok(v),
        Ok(v) => Err(format!("expected a finite number {bound}, found {v}")),
        Err(e) => Err(e.to_string()),
    }
}

/// How the tools that read a whole cache (`evaluate`, `score-edges`) go through it.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct CacheRunArgs {
    /// Use only the first N cached sequences (default: all).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub n_seqs: Option<u64>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Model folder or hub id (default: the one recorded in the cache manifest).
    #[arg(long)]
    pub model: Option<String>,
    /// Replace an existing, non-empty --out folder.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
}

impl CacheRunArgs {
    /// `--n-seqs` as a sequence limit.
    pub fn limit(&self) -> Option<usize> {
        self.n_seqs.map(|n| n as usize)
    }
}

/// Options of the pruned pass that every tool running it shares.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct PassArgs {
    /// Use the consistent attention b_dec term (mixed by the pattern with key-position LN
    /// scales) instead of the reference's query-position form (default: the reference's, for
    /// parity).
    #[arg(long)]
    pub consistent_attn_bias: bool,
}

impl PassArgs {
    /// The pass options these flags select.
    pub fn options(&self) -> crate::pass::PassOptions {
        crate::pass::PassOptions { consistent_attn_bias: self.consistent_attn_bias }
    }
}

/// Where token sequences come from when a tool runs the model itself (collect-acts, and the
/// training tools' streaming mode).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct DataArgs {
    /// Text dataset: .parquet (HF style), .jsonl, .jsonl.zst (as the Pile) or .txt (one
    /// document per line). Default: none (collect-acts requires it or --tokens; the training
    /// tools read it with --model instead of --acts).
    #[arg(long, conflicts_with = "tokens")]
    pub data: Option<std::path::PathBuf>,
    /// Pre-tokenized data: a .parquet list-of-integers column or a .safetensors file with a
    /// `tokens` tensor (n_seqs, ctx); each row is treated as one document. Default: none (the
    /// alternative to --data).
    #[arg(long)]
    pub tokens: Option<std::path::PathBuf>,
    /// Column (parquet) or field (jsonl) holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Parquet column holding token ids (default: `tokens`, else `input_ids`).
    #[arg(long)]
    pub tokens_column: Option<String>,
    /// Tokens per sequence (at most the model's n_ctx).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(2..))]
    pub ctx_len: u64,
    /// Put the BOS token first in every sequence (the default, as TransformerLens').
    #[arg(long, conflicts_with = "no_prepend_bos")]
    pub prepend_bos: bool,
    /// Do not prepend BOS (the reference's finetuning scripts).
    #[arg(long)]
    pub no_prepend_bos: bool,
    /// Concatenate documents separated by EOS instead of skipping those shorter than ctx_len
    /// (default: skip them, as the reference's buffer).
    #[arg(long)]
    pub pack: bool,
}

impl DataArgs {
    /// The input paths these flags name, for [`crate::util::io::refuse_overlap`].
    pub fn paths(&self) -> [(&'static str, Option<&std::path::Path>); 2] {
        [("--data", self.data.as_deref()), ("--tokens", self.tokens.as_deref())]
    }

    /// The source these flags name, if any.
    pub fn spec(&self) -> Option<crate::data::SourceSpec> {
        match (&self.data, &self.tokens) {
            (Some(p), _) => Some(crate::data::SourceSpec::Text { path: p.clone(), column: self.text_column.clone() }),
            (None, Some(p)) => {
                Some(crate::data::SourceSpec::Tokens { path: p.clone(), column: self.tokens_column.clone() })
            }
            (None, None) => None,
        }
    }

    /// Sequence options (BOS prepended unless --no-prepend-bos).
    pub fn options(&self) -> crate::data::SequenceOptions {
        crate::data::SequenceOptions {
            ctx_len: self.ctx_len as usize,
            prepend_bos: !self.no_prepend_bos,
            pack: self.pack,
        }
    }
}

/// Schedule, clipping and checkpoint options of the training tools.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct RunArgs {
    /// Warmup length as a proportion of the steps.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Proportion of the steps after which the lr decays linearly to 0 (reference: 0.8).
    #[arg(long, default_value_t = 0.8)]
    pub decay_start: f64,
    /// Per-module gradient-norm clip, or `none`.
    #[arg(long, default_value = "1.0")]
    #[serde(serialize_with = "number_or_word")]
    pub clip_grad: String,
    /// Write a checkpoint every N steps, after the last step, and where the lr starts to decay
    /// (checkpoint-decay/, so a finished run can be extended with a larger --steps). Default:
    /// no checkpoints, except on Ctrl-C.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(skip)]
    pub checkpoint_every: Option<u64>,
    /// Continue from `--out`/checkpoint with the same flags (a larger --steps extends a finished
    /// run from where its lr started to decay).
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Stop after this many steps of this run, keeping the checkpoint (for tests of resume).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub halt_after: Option<u64>,
    /// Replace an existing, non-empty --out folder (without --resume).
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
}

impl RunArgs {
    /// The checkpoint flags.
    pub fn checkpoints(&self) -> crate::train::checkpoints::CheckpointPolicy {
        crate::train::checkpoints::CheckpointPolicy {
            every: self.checkpoint_every,
            halt_after: self.halt_after,
            resume: self.resume,
        }
    }

    /// The schedule of a run of `steps` steps at learning rate `lr` (checked).
    pub fn schedule(&self, steps: u64, lr: f64) -> crate::error::Result<crate::train::Schedule> {
        let clip = self.clip()?;
        Ok(crate::train::Schedule { steps, lr, warmup: self.warmup, decay_start: self.decay_start, clip })
    }

    /// `--clip-grad` as a norm, `None` for `none`; checks the schedule proportions too.
    pub fn clip(&self) -> crate::error::Result<Option<f64>> {
        if !(0.0..=1.0).contains(&self.warmup)
            || !(0.0..=1.0).contains(&self.decay_start)
            || self.warmup > self.decay_start
        {
            return Err(crate::error::Error::Usage(format!(
                "--warmup {} / --decay-start {}: expected 0 <= warmup <= decay-start <= 1",
                self.warmup, self.decay_start
            )));
        }
        match self.clip_grad.as_str() {
            "none" => Ok(None),
            s => s.parse().ok().filter(|v: &f64| *v > 0.0).map(Some).ok_or_else(|| {
                crate::error::Error::Usage(format!("--clip-grad {s}: expected a positive number or `none`"))
            }),
        }
    }
}

/// A flag value that is a number or a word (`--clip-grad 1.0` / `none`) as a JSON number when it
/// parses as one, so that `1` and `1.0` are the same run.
fn number_or_word<S: serde::Serializer>(v: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => s.serialize_f64(x),
        _ => s.serialize_str(v),
    }
}

/// The finetuning loss and optimizer (`finetune`).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct FinetuneArgs {
    /// Training loss.
    #[arg(long, value_enum, default_value = "mse")]
    pub loss: crate::train::finetune::Loss,
    /// Weight of CE in `--loss mse+ce`.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub ce_weight: f64,
    /// Optimizer (Adam: betas 0.9, 0.999, eps 1e-8, as the reference).
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: crate::train::optim::OptimizerKind,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = positive_f64)]
    pub lr: f64,
    /// Use --lr as is instead of the reference's lr / sqrt(F / 2^14).
    #[arg(long)]
    pub no_scale_lr: bool,
    /// Introduce module m's loss term only from step (2·layer + [0 attn, 1 mlp]) · N (default:
    /// every module from step 0).
    #[arg(long)]
    pub stagger_steps: Option<u64>,
    /// Build the autograd graph for this many sequences at a time (memory follows it; the
    /// gradient is still the whole batch's, at the cost of one extra forward pass). Default:
    /// the whole batch.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub micro_batch: Option<u64>,
    /// AuxK weight (mse losses): dead latents' largest pre-top-k activations reconstruct the
    /// residual (dead as of the previous step). 0 (the reference's default) reproduces it.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub auxk_alpha: f64,
}

impl FinetuneArgs {
    /// Refuse flag combinations the loss or backend cannot honour (`engine`: the CPU engine
    /// runs the step; `batch_size`: sequences per step).
    pub fn check(&self, engine: bool, batch_size: u64) -> anyhow::Result<()> {
        use crate::train::finetune::Loss;
        if self.auxk_alpha > 0.0 && self.loss == Loss::Ce {
            anyhow::bail!(
                "--auxk-alpha {}: only with an mse loss (the reference's CE-mode AuxK is a no-op)",
                self.auxk_alpha
            );
        }
        if engine && self.micro_batch.is_some() {
            anyhow::bail!("--micro-batch: only for the autograd backend (the CPU engine's memory is already small); hint: --backend autograd");
        }
        if batch_size < 2 && self.loss != Loss::Ce {
            anyhow::bail!("--batch-size 1: the reference's FVU needs a variance over at least 2 sequences");
        }
        Ok(())
    }
}

/// Steps, batches and dead-feature tracking of the training tools.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct StepArgs {
    /// Sequences per step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Number of steps (or --n-tokens; one of them is required).
    #[arg(long, conflicts_with = "n_tokens", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(skip)]
    pub steps: Option<u64>,
    /// Train on this many tokens (steps = n_tokens / (batch_size · ctx_len)); one of --steps and
    /// --n-tokens is required. (`--tokens` names a pre-tokenized data file.)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(skip)]
    pub n_tokens: Option<u64>,
    /// Shuffle sequences within each cache shard every epoch (default: cache order, as the
    /// reference).
    #[arg(long)]
    pub shuffle: bool,
    /// A feature is dead after this many tokens without a non-zero value.
    #[arg(long, default_value_t = 10_000_000)]
    pub dead_threshold: u64,
}

impl StepArgs {
    /// The run's steps for sequences of `ctx` tokens.
    pub fn steps(&self, ctx: usize) -> crate::error::Result<u64> {
        crate::train::steps_for(self.steps, self.n_tokens, self.batch_size * ctx as u64)
    }

    /// Where training batches come from: `cache`, or (without one) `model` run over the data
    /// that `data` names, read with its `tokenizer`. Checks the batch size against the cache.
    pub fn train_data<'a>(
        &self,
        cache: Option<&'a crate::formats::cache::Cache>,
        model: Option<&'a crate::model::Model>,
        tokenizer: Option<&'a crate::model::tokenize::TextTokenizer>,
        data: &DataArgs,
        seed: u64,
        device: &Device,
    ) -> crate::error::Result<crate::train::data::TrainData<'a>> {
        use crate::train::data::TrainData;
        if let Some(c) = cache {
            if self.batch_size as usize > c.manifest.n_seqs {
                return Err(crate::error::Error::Usage(format!(
                    "--batch-size {}: the cache {} has only {} sequences",
                    self.batch_size,
                    c.dir.display(),
                    c.manifest.n_seqs
                )));
            }
            return Ok(TrainData::from_cache(c, self.shuffle, seed, device));
        }
        let spec = data
            .spec()
            .ok_or_else(|| crate::error::Error::Usage("--data or --tokens is required without --acts".into()))?;
        if self.shuffle {
            return Err(crate::error::Error::Usage(
                "--shuffle: streaming reads the data in file order; shuffle the file instead".into(),
            ));
        }
        let (Some(model), Some(tok)) = (model, tokenizer) else {
            return Err(crate::error::Error::Usage("--data/--tokens need --model (the model to run)".into()));
        };
        TrainData::streaming(model, tok, spec, data.options(), device)
    }
}

/// How a training step is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU engine for f32 on the CPU, autograd otherwise.
    Auto,
    /// The hand-written CPU engine (f32, CPU only; the fastest on a CPU).
    Engine,
    /// candle autograd with the optimizer on the device (any device and dtype).
    Autograd,
}

/// Compute dtype of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    F32,
    /// Mixed precision: the forward/backward in bf16; parameters, gradients, optimizer state
    /// and losses in f32.
    Bf16,
}

/// `--dtype` and `--backend` of the training tools.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct ComputeArgs {
    /// Compute dtype (bf16: mixed precision with f32 master weights).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ComputeDType,
    /// Step implementation.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
}

impl Backend {
    /// Whether the CPU engine runs the steps at `dtype` on `device` (else the autograd path),
    /// checking the choice.
    pub fn use_engine(self, device: &Device, dtype: ComputeDType) -> crate::error::Result<bool> {
        let f32_cpu = device.is_cpu() && dtype == ComputeDType::F32;
        match self {
            Backend::Engine if !f32_cpu => Err(crate::error::Error::Usage(format!(
                "--backend engine: the CPU engine runs f32 on the CPU only (found {}, --dtype {:?}); hint: --backend autograd",
                if device.is_cpu() { "cpu" } else { "a GPU" },
                dtype
            ))),
            Backend::Engine => Ok(true),
            Backend::Autograd => Ok(false),
            Backend::Auto => Ok(f32_cpu),
        }
    }
}

impl ComputeArgs {
    /// Whether the CPU engine runs the steps (else the autograd path), checking the choice
    /// against `device`.
    pub fn use_engine(&self, device: &Device) -> crate::error::Result<bool> {
        self.backend.use_engine(device, self.dtype)
    }

    /// The candle dtype of the pass.
    pub fn dtype(&self) -> DType {
        match self.dtype {
            ComputeDType::F32 => DType::F32,
            ComputeDType::Bf16 => DType::BF16,
        }
    }
}
