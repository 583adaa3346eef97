//! Command-line arguments (clap).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Make a transformer fit a latency budget: measure, prune (ZipLM structured OBS),
/// search per-layer shapes, emit a model the runtime loads as it is.
#[derive(Parser, Debug)]
#[command(name = "ziplm", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Prune a model to one or more latency budgets (one model per budget).
    Prune(Box<PruneArgs>),
    /// Measure block latencies on this machine and write a latency table (JSON).
    Profile(ProfileArgs),
    /// Print a stable summary of a model's prunable structure.
    Inspect(InspectArgs),
    /// Evaluate a model's quality (STS Benchmark Spearman for encoders, perplexity for LLMs).
    Eval(EvalArgs),
    /// Time emitted models against the dense model in their runtime (alternating runs)
    /// and print each speedup (the median of the rounds' ratios).
    Speedup(SpeedupArgs),
}

impl Command {
    /// Whether the command was asked for JSON output (`--json`).
    pub fn json(&self) -> bool {
        match self {
            Command::Prune(a) => a.json,
            Command::Profile(a) => a.json,
            Command::Inspect(a) => a.json,
            Command::Eval(a) => a.json,
            Command::Speedup(a) => a.json,
        }
    }
}

/// Where and how the model runs.
#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Sequences per call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence (prefill), or new tokens per step (decode) [default: 128].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Time decode steps with a KV cache of this many tokens instead of prefill.
    #[arg(long)]
    pub decode_kv_len: Option<usize>,
    /// CPU threads of the target (1 and N threads are different targets) [default: 1
    /// for ONNX models; candle's thread pool for LLMs].
    #[arg(long, conflicts_with = "cuda")]
    pub threads: Option<usize>,
    /// Target CUDA device N instead of the CPU (ONNX models; needs a ziplm built with
    /// `--features cuda`, or a latency table profiled on the GPU).
    #[arg(long, value_name = "N")]
    pub cuda: Option<usize>,
}

/// GQA policy on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum GqaArg {
    /// Remove whole KV groups (query heads and their K/V).
    WholeKvGroups,
    /// Remove query heads, the same number in every KV group.
    EqualPerKvGroup,
}

/// Sequential correction's target on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SequentialTargetArg {
    /// The dense block output and the drift its residual input carries.
    Residual,
    /// The dense block output alone.
    Output,
    /// The block's own output on the pruned model's inputs (OBS on the dense weights
    /// and the pruned inputs' Gram matrix, as SparseGPT's sequential pass).
    Inputs,
}

/// Emitted LLM format on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LlmFormatArg {
    /// One GGUF file (per-layer FFN widths; needs a GGUF source).
    Gguf,
    /// A Hugging Face folder (config.json + model.safetensors), one FFN width.
    Safetensors,
}

/// GGUF tensor type on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufDTypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// ggml Q8_0.
    #[value(name = "q8_0")]
    Q8_0,
    /// ggml Q4_K (FFN widths in multiples of 256).
    #[value(name = "q4_k")]
    Q4K,
}

/// Calibration data format.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// Plain text.
    Text,
    /// JSON lines with a "text" field.
    Jsonl,
    /// STS Benchmark TSV (both sentences of every pair).
    StsTsv,
}

/// `ziplm prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// The model (ONNX for tract). Omit when --config names it.
    pub model: Option<PathBuf>,
    /// Serving config (TOML) or a Cargo.toml with [package.metadata.ziplm].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Target speedup over the dense model (repeatable: one model per budget).
    #[arg(long)]
    pub speedup: Vec<f64>,
    /// Target latency in milliseconds at the workload (repeatable).
    #[arg(long)]
    pub latency_ms: Vec<f64>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Calibration data (text, .jsonl, or STS .csv/.tsv), or `self:N`: N tokens of chat
    /// transcripts a chat LLM writes itself (`self`: as many as the samples need),
    /// cached. Give it more than once to mix sources: the samples are split evenly
    /// between them. Default: random token ids.
    #[arg(long, value_name = "FILE|self:N")]
    pub calibration: Vec<PathBuf>,
    /// Format of the calibration file (default: from the extension).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Calibration samples.
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Tokens per calibration sample (with --calibration) [default: 128; LLMs: 512].
    #[arg(long)]
    pub calibration_seq_len: Option<usize>,
    /// Calibrate a chat model on the --calibration files alone. By default a chat LLM
    /// (mistralrs backend, a chat template) calibrates on its own chat transcripts too,
    /// one more share of the samples (as `--calibration self`), so that its replies
    /// survive the pruning.
    #[arg(long)]
    pub no_self_chat: bool,
    /// The model's tokenizer.json (default: next to the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output folder for the models, plans and report [default: ziplm-out].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Latency table to reuse and update.
    #[arg(long)]
    pub latency_table: Option<PathBuf>,
    /// Seed for sampling and refinement.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How GQA heads are removed.
    #[arg(long, value_enum, default_value = "whole-kv-groups")]
    pub gqa: GqaArg,
    /// FFN widths kept are multiples of this.
    #[arg(long, default_value_t = 32)]
    pub ffn_multiple: usize,
    /// Skip timing the emitted models end to end.
    #[arg(long)]
    pub no_verify: bool,
    /// Search with the candle block table as it is, without fitting it to mistral.rs
    /// first (two probe models timed against the dense one; mistralrs backend).
    #[arg(long)]
    pub no_runtime_fit: bool,
    /// Solve the runtime fit again with each verified model's timing as one more point
    /// before the next search, instead of keeping the probes' fit (mistralrs backend;
    /// experimental).
    #[arg(long)]
    pub refit: bool,
    /// After each search, re-fit every pruned block on the pruned model's own inputs,
    /// block by block: OBS on the re-targeted weights re-chooses which heads or neurons
    /// each block keeps (not how many) and fits them (sequential correction, ZIPLM.md
    /// section 8).
    #[arg(long)]
    pub sequential: bool,
    /// What --sequential fits each block to: `residual` (the dense output plus the drift
    /// its residual input carries) or `output` (the dense output alone) [default:
    /// residual].
    #[arg(long, value_enum, requires = "sequential")]
    pub sequential_target: Option<SequentialTargetArg>,
    /// Make --sequential keep the heads and neurons the database chose and only re-fit
    /// their out-projection columns (the default re-chooses them on the re-targeted
    /// weights).
    #[arg(long, requires = "sequential")]
    pub sequential_keep_choice: bool,
    /// After verification, distil each pruned model towards the dense one on this many
    /// calibration tokens (the gradual mode, ZIPLM.md section 9; mistralrs backend).
    /// 8 calibration windows are held out of every fit for early stopping. With
    /// --chain, one figure per stage may be given, smallest speedup first
    /// (16384,81920).
    #[arg(
        long,
        value_name = "TOKENS[,TOKENS...]",
        value_delimiter = ',',
        num_args = 1
    )]
    pub recover: Option<Vec<u64>>,
    /// Peak learning rate of --recover (AdamW, cosine to a tenth of it) [default: 1e-5].
    /// Several, comma-separated (1e-5,3e-5): each is tried for the first 8 steps from
    /// the same start, and recovery goes on with the one whose held-out perplexity is
    /// lowest.
    #[arg(
        long,
        value_name = "LR[,LR...]",
        requires = "recover",
        value_delimiter = ','
    )]
    pub recover_lr: Option<Vec<f64>>,
    /// Distil towards this model instead of the one pruned (--recover), and let it write
    /// the chat calibration: to prune an already pruned and recovered model further
    /// (prune -> recover -> prune), give the original dense model. Budgets stay relative
    /// to the model pruned.
    #[arg(long, value_name = "MODEL", requires = "recover")]
    pub teacher: Option<PathBuf>,
    /// Prune the --speedup budgets as a chain (prune -> recover -> prune): the smallest
    /// from the model, each next one from the last one's recovered model, each stage
    /// distilled towards the original and its speedup stated against the original.
    #[arg(long, requires = "recover")]
    pub chain: bool,
    /// Also write each pruned model as a tract NNEF archive (NAME.nnef.tar).
    #[arg(long)]
    pub nnef: bool,
    /// Refine the search with the model's output loss (SPDY), up to this many
    /// evaluations per search; 0 = the plain error-sum DP.
    #[arg(long, default_value_t = 32)]
    pub refine: usize,
    /// Verified searches after the first: when a timed model misses the budget, or beats
    /// it by more than 5%, the search runs again with the measurement's correction (at
    /// most 16) [default: 3].
    #[arg(long)]
    pub retries: Option<usize>,
    /// Timings a verified model gets after its first while the ~95% interval of its
    /// measured speedup (or latency) straddles the budget; the rounds are pooled (at
    /// most 8) [default: 2].
    #[arg(long)]
    pub extra_timings: Option<usize>,
    /// Largest fraction of one layer's FFN neurons removed short of dropping the layer
    /// (1.0 = any width down to the grid's smallest). 0.5 helped SmolLM2 a lot (README).
    #[arg(long, default_value_t = 1.0)]
    pub max_ffn_removed: f64,
    /// Tensor type of the pruned projections in emitted GGUF files (mistralrs backend)
    /// [default: f32].
    #[arg(long, value_enum)]
    pub gguf_dtype: Option<GgufDTypeArg>,
    /// Format of emitted LLMs (mistralrs backend; default: the source's format).
    #[arg(long, value_enum)]
    pub llm_format: Option<LlmFormatArg>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `ziplm profile`.
#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// The model.
    pub model: PathBuf,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Where to write the table.
    #[arg(long, short)]
    pub out: PathBuf,
    /// FFN widths on this grid.
    #[arg(long, default_value_t = 32)]
    pub ffn_multiple: usize,
    /// How GQA heads are removed.
    #[arg(long, value_enum, default_value = "whole-kv-groups")]
    pub gqa: GqaArg,
    /// Timed runs per shape (default: 9 for ONNX; 15 in 3 passes for GGUF files and
    /// folders, as `prune` profiles them).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Largest fraction of one layer's FFN neurons removed short of dropping the layer
    /// (the same grid as `prune --max-ffn-removed`).
    #[arg(long, default_value_t = 1.0)]
    pub max_ffn_removed: f64,
    /// Tensor type of the pruned projections the table is for (GGUF models; the same as
    /// `prune --gguf-dtype`) [default: f32].
    #[arg(long, value_enum)]
    pub gguf_dtype: Option<GgufDTypeArg>,
    /// Print the table as JSON on stdout too.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `ziplm inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The model.
    pub model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub workload: WorkloadArgs,
}

/// `ziplm speedup`.
#[derive(Args, Debug)]
pub struct SpeedupArgs {
    /// The dense model (ONNX file, GGUF file or Hugging Face folder).
    pub dense: PathBuf,
    /// The models to time against it (served by the same runtime).
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Timed runs of each model and of the dense model (alternating rounds); the
    /// speedup is the median of the rounds' ratios.
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Untimed runs of each first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub workload: WorkloadArgs,
}

/// `ziplm eval`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("data").required(true).multiple(true).args(["sts", "text", "probes"])))]
pub struct EvalArgs {
    /// The model: an ONNX encoder (with --sts) or an LLM, GGUF file or Hugging Face
    /// folder (with --text).
    pub model: PathBuf,
    /// STS Benchmark file (tab-separated) to evaluate an encoder on.
    #[arg(long)]
    pub sts: Option<PathBuf>,
    /// Text file for an LLM's perplexity: tokenised whole without BOS, cut into
    /// non-overlapping windows, mean NLL over every predicted token.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// The dense model a pruned LLM was made from: with --text, also report the
    /// next-token agreement and KL(dense || model) on the same windows; with --probes,
    /// also ask it the probes and count the ones both answer.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Ask an LLM plain questions through its chat template (greedy replies, checked by
    /// keyword): the 40 that ship with ziplm (data/probes.jsonl), or --probe-set's.
    #[arg(long)]
    pub probes: bool,
    /// A probe set of your own for --probes: JSON lines of
    /// {"question": ..., "keywords": [...]}.
    #[arg(long, requires = "probes")]
    pub probe_set: Option<PathBuf>,
    /// Largest reply to a probe, in tokens.
    #[arg(long, default_value_t = 32)]
    pub reply_tokens: usize,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Evaluate only the first N windows (default: the whole text).
    #[arg(long)]
    pub windows: Option<usize>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// The model's tokenizer.json (default: next to the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Sentences per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per sentence (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
