//! Running each command.

use super::args::{
    Cli, Command, EvalArgs, FormatArg, GgufDTypeArg, GqaArg, InspectArgs, LlmFormatArg,
    ProfileArgs, PruneArgs, SpeedupArgs, WorkloadArgs,
};
use crate::data::{CalibrationData, DataFormat};
use crate::inspect;
use crate::job::{Device, PruneJob};
use crate::progress::{Bars, Progress, Quiet};
use crate::search::Budget;
use anyhow::bail;
use std::process::ExitCode;
use ziplm_plugin_api::{GqaPolicy, Phase, Workload};

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Prune(a) => prune(a),
        Command::Profile(a) => profile(a),
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => eval(a),
        Command::Speedup(a) => speedup(a),
    }
}

fn workload(w: &WorkloadArgs) -> Workload {
    Workload {
        batch: w.batch,
        seq_len: w.seq_len.unwrap_or(DEFAULT_SEQ_LEN),
        phase: match w.decode_kv_len {
            Some(kv_len) => Phase::Decode { kv_len },
            None => Phase::Prefill,
        },
    }
}

/// `--seq-len` when not given.
const DEFAULT_SEQ_LEN: usize = 128;

fn gqa(g: GqaArg) -> GqaPolicy {
    match g {
        GqaArg::WholeKvGroups => GqaPolicy::WholeKvGroups,
        GqaArg::EqualPerKvGroup => GqaPolicy::EqualPerKvGroup,
    }
}

fn progress(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Quiet)
    } else {
        Box::new(Bars::default())
    }
}

fn job_from_args(a: &PruneArgs) -> anyhow::Result<Vec<PruneJob>> {
    if let Some(cfg) = &a.config {
        // The config names each model, its budgets, workload and output folder: a flag
        // for one of them would be dropped, so it is refused.
        let given: Vec<&str> = [
            (a.model.is_some(), "MODEL"),
            (!a.speedup.is_empty(), "--speedup"),
            (!a.latency_ms.is_empty(), "--latency-ms"),
            (a.out.is_some(), "--out"),
            (a.workload.seq_len.is_some(), "--seq-len"),
            (a.workload.decode_kv_len.is_some(), "--decode-kv-len"),
            (a.calibration.is_some(), "--calibration"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if !given.is_empty() {
            bail!(
                "{} cannot be combined with --config: the config sets each model, its budgets, workload, calibration and output folder (set them there, or leave out --config)",
                given.join(", ")
            );
        }
        let jobs = crate::config::load_jobs(cfg)?;
        return Ok(jobs);
    }
    let Some(model) = &a.model else {
        bail!("give a model file (ziplm prune MODEL) or a serving config (--config ziplm.toml)");
    };
    let mut job = PruneJob::new(model);
    job.workload = workload(&a.workload);
    job.device = Device::Cpu {
        threads: a.workload.threads,
    };
    let mut budgets: Vec<Budget> = a.speedup.iter().map(|&s| Budget::Speedup(s)).collect();
    budgets.extend(a.latency_ms.iter().map(|&ms| Budget::LatencyMs(ms)));
    if !budgets.is_empty() {
        job.budgets = budgets;
    }
    if a.calibration.is_none() && a.calibration_seq_len.is_some() {
        bail!("--calibration-seq-len sets the length of calibration samples: give --calibration FILE too");
    }
    job.calibration = a.calibration.as_ref().map(|p| CalibrationData {
        path: p.clone(),
        format: a.format.map(|f| match f {
            FormatArg::Text => DataFormat::Text,
            FormatArg::Jsonl => DataFormat::Jsonl,
            FormatArg::StsTsv => DataFormat::StsTsv,
        }),
        samples: a.samples,
        seq_len: a.calibration_seq_len.unwrap_or(DEFAULT_SEQ_LEN),
    });
    job.random_samples = a.samples.min(64);
    job.tokenizer = a.tokenizer.clone();
    job.out_dir = a.out.clone().unwrap_or_else(|| "ziplm-out".into());
    job.latency_table = a.latency_table.clone();
    job.seed = a.seed;
    job.gqa_policy = gqa(a.gqa);
    if a.ffn_multiple == 0 {
        bail!("--ffn-multiple must be at least 1 (FFN widths are kept in multiples of it)");
    }
    job.database.ffn_width_multiple = a.ffn_multiple;
    if !(0.0..=1.0).contains(&a.max_ffn_removed) {
        bail!(
            "--max-ffn-removed must be between 0 and 1 (a fraction of each FFN), got {}",
            a.max_ffn_removed
        );
    }
    job.database.max_ffn_removed_fraction = a.max_ffn_removed;
    job.verify = !a.no_verify;
    job.runtime_fit = !a.no_runtime_fit;
    job.nnef = a.nnef;
    // Options of one backend are refused for a model of another.
    let llm = job.backend == crate::job::BackendKind::MISTRALRS;
    for (given, flag) in [
        (a.gguf_dtype.is_some(), "--gguf-dtype"),
        (a.llm_format.is_some(), "--llm-format"),
        (a.no_runtime_fit, "--no-runtime-fit"),
    ] {
        if given && !llm {
            bail!("{flag} is an option of the mistralrs backend (GGUF files and model folders); {} is not one", model.display());
        }
    }
    if a.nnef && llm {
        bail!(
            "--nnef writes tract NNEF archives of ONNX models; {} is not one",
            model.display()
        );
    }
    job.gguf_dtype = a.gguf_dtype.map(gguf_dtype).unwrap_or_default();
    job.llm_format = a.llm_format.map(|f| match f {
        LlmFormatArg::Gguf => crate::job::LlmFormat::Gguf,
        LlmFormatArg::Safetensors => crate::job::LlmFormat::Safetensors,
    });
    job.search.refine = crate::search::spdy::RefineConfig::with_evaluations(a.refine, a.seed);
    Ok(vec![job])
}

fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let jobs = job_from_args(&a)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if a.workload.threads > cores {
        eprintln!(
            "ziplm: warning: --threads {} is more than this machine's {cores} cores: the latencies will be those of an oversubscribed CPU",
            a.workload.threads
        );
    }
    let progress = progress(a.quiet);
    let mut missed = false;
    let mut reports = vec![];
    for job in &jobs {
        if job.calibration.is_none() {
            eprintln!(
                "ziplm: no calibration data given: calibrating on {} random token sequences (fine for test models; pass --calibration for real ones)",
                job.random_samples
            );
        }
        let report = crate::backend::run_job(job, progress.as_ref())?;
        missed |= report.budgets.iter().any(|b| b.met == Some(false));
        if !a.json {
            print!("{}", report.to_text());
            println!("\nwritten to {}", job.out_dir.display());
        }
        reports.push(report);
    }
    if a.json {
        let v = if reports.len() == 1 {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::to_value(&reports)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(if missed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The job's GGUF tensor type for a `--gguf-dtype` value.
fn gguf_dtype(a: GgufDTypeArg) -> crate::job::GgufDType {
    match a {
        GgufDTypeArg::F32 => crate::job::GgufDType::F32,
        GgufDTypeArg::F16 => crate::job::GgufDType::F16,
        GgufDTypeArg::Q8_0 => crate::job::GgufDType::Q8_0,
        GgufDTypeArg::Q4K => crate::job::GgufDType::Q4K,
    }
}

fn profile(a: ProfileArgs) -> anyhow::Result<ExitCode> {
    let w = workload(&a.workload);
    if !(0.0..=1.0).contains(&a.max_ffn_removed) {
        bail!(
            "--max-ffn-removed must be between 0 and 1 (a fraction of each FFN), got {}",
            a.max_ffn_removed
        );
    }
    if a.ffn_multiple == 0 {
        bail!("--ffn-multiple must be at least 1 (FFN widths are kept in multiples of it)");
    }
    let cfg = crate::database::DatabaseConfig {
        ffn_width_multiple: a.ffn_multiple,
        max_ffn_removed_fraction: a.max_ffn_removed,
        ..Default::default()
    };
    // The same settings a prune job of this model would profile with.
    let backend = crate::job::BackendKind::of(&a.model);
    let mut settings = backend.profile_settings();
    if let Some(runs) = a.runs {
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        settings.runs = runs;
    }
    let reuse = if a.out.exists() {
        crate::profile::load_table(&a.out).ok()
    } else {
        None
    };
    let progress = progress(a.quiet);
    let request = crate::backend::ProfileRequest {
        workload: w,
        threads: a.workload.threads,
        grid: &cfg,
        gqa_policy: gqa(a.gqa),
        gguf_dtype: gguf_dtype(a.gguf_dtype),
        settings,
        reuse: reuse.as_ref(),
    };
    let table =
        crate::backend::named(backend.name())?.profile(&a.model, &request, progress.as_ref())?;
    crate::profile::save_table(&table, &a.out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&table)?);
    } else {
        println!(
            "{} shapes + rest ({:.3} ms) on {} at {}; written to {}",
            table.entries.len(),
            table.rest.median_ms,
            table.key.target,
            w,
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let structure = crate::backend::load_structure(&a.model, &workload(&a.workload))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspect::summary(&structure))?
        );
    } else {
        print!("{}", inspect::inspect_text(&structure));
    }
    Ok(ExitCode::SUCCESS)
}

fn speedup(a: SpeedupArgs) -> anyhow::Result<ExitCode> {
    let w = workload(&a.workload);
    let settings = crate::profile::ProfileSettings::new(a.warmup, a.runs);
    let results = crate::speedup::measure(
        &a.dense,
        &a.models,
        &w,
        a.workload.threads,
        &settings,
        progress(a.quiet).as_ref(),
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dense": a.dense, "workload": w, "runs": a.runs,
                "warmup": a.warmup, "models": results,
            }))?
        );
    } else {
        println!(
            "{w}, medians of {} alternating runs against {}:",
            a.runs,
            a.dense.display()
        );
        for r in &results {
            println!(
                "  {}: {:.3} ms vs dense {:.3} ms -> {:.3}x",
                r.model.display(),
                r.timing.median_ms,
                r.dense.median_ms,
                r.speedup
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    // The checks prune makes of a workload (batch and sequence length at least 1).
    Workload::prefill(a.batch, a.seq_len)
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (--batch, --seq-len)"))?;
    match (&a.sts, &a.text) {
        (Some(sts), _) => eval_sts(&a, sts),
        (None, Some(text)) => eval_perplexity(&a, text),
        (None, None) => bail!("give --sts FILE (encoders) or --text FILE (LLM perplexity)"),
    }
}

fn eval_perplexity(a: &EvalArgs, text: &std::path::Path) -> anyhow::Result<ExitCode> {
    use crate::backend::mistralrs::eval::text_perplexity;
    // Nothing is timed here: let the allocator keep the forward's buffers (~1.5x).
    crate::memory::keep_freed_buffers();
    let started = std::time::Instant::now();
    let p = text_perplexity(
        &a.model,
        text,
        a.tokenizer.as_deref(),
        a.window,
        a.windows,
        progress(a.quiet).as_ref(),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "text": text, "metric": "perplexity", "value": p.ppl,
                "mean_nll": p.mean_nll, "tokens": p.tokens, "windows": p.windows,
                "window": a.window, "seconds": seconds,
            })
        );
    } else {
        println!(
            "perplexity {:.3} (mean NLL {:.5} nats) over {} predicted tokens in {} windows of {} ({:.1} s)",
            p.ppl, p.mean_nll, p.tokens, p.windows, a.window, seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_sts(a: &EvalArgs, sts_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (score, pairs) = crate::backend::tract::encode::sts_score(
        &a.model,
        a.tokenizer.as_deref(),
        sts_path,
        a.batch,
        a.seq_len,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "model": a.model, "metric": "sts_spearman_x100", "pairs": pairs, "value": score })
        );
    } else {
        println!("STS Spearman x100: {score:.2} ({pairs} pairs)");
    }
    Ok(ExitCode::SUCCESS)
}
