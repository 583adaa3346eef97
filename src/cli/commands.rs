//! Running each command.

use super::args::{
    Cli, Command, EvalArgs, FormatArg, GgufDTypeArg, GqaArg, InspectArgs, LlmFormatArg,
    ProfileArgs, PruneArgs, SequentialTargetArg, SpeedupArgs, WorkloadArgs,
};
use crate::data::DataFormat;
use crate::inspect;
use crate::job::request::{JobRequest, Origin, RawOption, Resolved, DEFAULT_SEQ_LEN};
use crate::job::Device;
use crate::pipeline::correct::SequentialTarget;
use crate::progress::{Bars, Progress, Quiet};
use anyhow::bail;
use std::process::ExitCode;
use ziplm_plugin_api::{GqaPolicy, Phase, Workload};

/// Runs a command; `given` names the arguments written on its command line.
pub fn dispatch(cli: Cli, given: &[String]) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Prune(a) => prune(*a, given),
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

/// A backend option given as a flag.
fn option(name: &str, value: &str, flag: &str) -> RawOption {
    RawOption {
        name: name.into(),
        value: value.into(),
        spelled: flag.into(),
    }
}

/// The flags `ziplm prune` and `ziplm profile` share, lowered into a raw job.
fn target_request(model: &std::path::Path, w: &WorkloadArgs, gqa_arg: GqaArg) -> JobRequest {
    let mut r = JobRequest::new(Origin::Cli);
    r.model = Some(model.to_path_buf());
    r.batch = Some(w.batch);
    r.seq_len = w.seq_len;
    r.kv_len = w.decode_kv_len;
    r.threads = w.threads;
    r.cuda = w.cuda;
    r.gqa = Some(gqa(gqa_arg));
    r
}

/// Lowers `ziplm prune`'s flags into raw jobs: one, or one per model of `--config`.
/// `given` names the arguments written on the command line.
pub(super) fn prune_requests(a: &PruneArgs, given: &[String]) -> anyhow::Result<Vec<JobRequest>> {
    if let Some(cfg) = &a.config {
        // The config sets the whole job: a flag beside it would be dropped, so it is
        // refused (only --json and --quiet, which shape the output, go with it).
        let dropped: Vec<String> = given
            .iter()
            .filter(|id| !["config", "json", "quiet"].contains(&id.as_str()))
            .map(|id| match id.as_str() {
                "model" => "MODEL".to_string(),
                other => format!("--{}", other.replace('_', "-")),
            })
            .collect();
        if !dropped.is_empty() {
            bail!(
                "{} cannot be combined with --config: the config sets each model, its budgets, workload, calibration, output folder and options (set them there, or leave out --config)",
                dropped.join(", ")
            );
        }
        return Ok(crate::config::load_requests(cfg)?);
    }
    let Some(model) = &a.model else {
        bail!("give a model file (ziplm prune MODEL) or a serving config (--config ziplm.toml)");
    };
    let mut r = target_request(model, &a.workload, a.gqa);
    r.speedup = a.speedup.clone();
    r.latency_ms = a.latency_ms.clone();
    r.calibration = a.calibration.clone();
    r.calibration_format = a.format.map(|f| match f {
        FormatArg::Text => DataFormat::Text,
        FormatArg::Jsonl => DataFormat::Jsonl,
        FormatArg::StsTsv => DataFormat::StsTsv,
    });
    r.samples = Some(a.samples);
    r.calibration_seq_len = a.calibration_seq_len;
    r.self_chat = Some(!a.no_self_chat);
    r.tokenizer = a.tokenizer.clone();
    r.out = a.out.clone();
    r.latency_table = a.latency_table.clone();
    r.seed = Some(a.seed);
    r.ffn_multiple = Some(a.ffn_multiple);
    r.max_ffn_removed = Some(a.max_ffn_removed);
    r.verify = Some(!a.no_verify);
    r.refine = Some(a.refine);
    r.retries = a.retries;
    r.extra_timings = a.extra_timings;
    if a.no_runtime_fit {
        r.options
            .push(option("runtime_fit", "false", "--no-runtime-fit"));
    }
    if a.refit {
        r.options.push(option("refit", "true", "--refit"));
    }
    if a.nnef {
        r.options.push(option("nnef", "true", "--nnef"));
    }
    r.sequential = Some(a.sequential);
    r.sequential_keep_choice = Some(a.sequential_keep_choice);
    r.sequential_target = a.sequential_target.map(|t| match t {
        SequentialTargetArg::Residual => SequentialTarget::Residual,
        SequentialTargetArg::Output => SequentialTarget::Output,
        SequentialTargetArg::Inputs => SequentialTarget::Inputs,
    });
    if let Some(tokens) = a.recover.as_deref().filter(|t| !t.is_empty()) {
        let mut s = crate::job::RecoverySettings::with_tokens(tokens[0]);
        if tokens.len() > 1 {
            s.stage_tokens = tokens.to_vec();
        }
        if let Some(lrs) = a.recover_lr.as_deref().filter(|l| !l.is_empty()) {
            // Each rate ends at a tenth of itself (trials scale the minimum with the peak).
            s.learning_rate = lrs[0];
            s.min_learning_rate = lrs[0] / 10.0;
            if lrs.len() > 1 {
                s.learning_rate_trials = lrs.to_vec();
            }
        }
        s.teacher = a.teacher.clone();
        s.chain = a.chain;
        r.recovery = Some(s);
    }
    if let Some(d) = a.gguf_dtype {
        r.options
            .push(option("gguf_dtype", gguf_dtype(d), "--gguf-dtype"));
    }
    if let Some(f) = a.llm_format {
        let value = match f {
            LlmFormatArg::Gguf => "gguf",
            LlmFormatArg::Safetensors => "safetensors",
        };
        r.options.push(option("llm_format", value, "--llm-format"));
    }
    Ok(vec![r])
}

/// Parses `ziplm prune ...` arguments and resolves them into jobs without running
/// anything (what `prune` runs; also the fuzz target's entry).
pub(super) fn resolve_prune(a: &PruneArgs, given: &[String]) -> anyhow::Result<Vec<Resolved>> {
    prune_requests(a, given)?
        .iter()
        .map(|r| Ok(r.resolve()?))
        .collect()
}

fn prune(a: PruneArgs, given: &[String]) -> anyhow::Result<ExitCode> {
    let resolved = resolve_prune(&a, given)?;
    let progress = progress(a.quiet);
    let mut missed = false;
    let mut reports = vec![];
    for Resolved { job, warnings } in &resolved {
        for w in warnings {
            eprintln!("ziplm: warning: {w}");
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

/// The backend option value of a `--gguf-dtype` flag.
fn gguf_dtype(a: GgufDTypeArg) -> &'static str {
    match a {
        GgufDTypeArg::F32 => "f32",
        GgufDTypeArg::F16 => "f16",
        GgufDTypeArg::Q8_0 => "q8_0",
        GgufDTypeArg::Q4K => "q4_k",
    }
}

fn profile(a: ProfileArgs) -> anyhow::Result<ExitCode> {
    // The checks and defaults of a prune job of this model.
    let mut r = target_request(&a.model, &a.workload, a.gqa);
    r.ffn_multiple = Some(a.ffn_multiple);
    r.max_ffn_removed = Some(a.max_ffn_removed);
    r.runs = a.runs;
    if let Some(d) = a.gguf_dtype {
        r.options
            .push(option("gguf_dtype", gguf_dtype(d), "--gguf-dtype"));
    }
    let job = r.resolve_target()?;
    let w = job.workload;
    let backend = crate::backend::named(job.backend.name())?;
    let reuse = if a.out.exists() {
        crate::profile::load_table(&a.out).ok()
    } else {
        None
    };
    let progress = progress(a.quiet);
    let request = crate::backend::ProfileRequest {
        workload: w,
        device: job.device,
        grid: &job.database,
        gqa_policy: job.gqa_policy,
        options: &job.options,
        settings: job.profile,
        reuse: reuse.as_ref(),
    };
    let table = backend.profile(&a.model, &request, progress.as_ref())?;
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
    w.validate()
        .map_err(|e| anyhow::anyhow!("{e} (--batch, --seq-len, --decode-kv-len)"))?;

    let settings = crate::profile::ProfileSettings::new(a.warmup, a.runs);
    let results = crate::speedup::measure(
        &a.dense,
        &a.models,
        &w,
        match a.workload.cuda {
            Some(device) => Device::Cuda { device },
            None => Device::Cpu {
                threads: a.workload.threads.unwrap_or(1),
            },
        },
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
            "{w}, {} alternating rounds against {} (medians; the speedup is the median of the rounds' ratios):",
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
            if let Some(note) = &r.dense_as {
                println!("    note: {note}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    // The checks prune makes of a workload (batch and sequence length at least 1).
    Workload::prefill(a.batch, a.seq_len)
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (--batch, --seq-len)"))?;
    if let Some(sts) = &a.sts {
        if a.text.is_some() || a.probes || a.reference.is_some() {
            bail!("--sts evaluates an encoder; --text, --probes and --reference are for LLMs: give one or the other");
        }
        return eval_sts(&a, sts);
    }
    if a.reference.is_some() && a.text.is_none() && !a.probes {
        bail!("--reference compares with a dense model on --text or --probes: give one of them");
    }
    if a.reply_tokens == 0 {
        bail!("--reply-tokens must be at least 1");
    }
    let mut json = serde_json::json!({ "model": a.model });
    if let Some(text) = &a.text {
        // The perplexity's keys at the top level (the form `eval --text` always had).
        if let serde_json::Value::Object(m) = eval_perplexity(&a, text)? {
            json.as_object_mut().expect("an object").extend(m);
        }
    }
    if a.probes {
        json["probes"] = eval_probes(&a, a.probe_set.as_deref())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_perplexity(a: &EvalArgs, text: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use crate::backend::mistralrs::eval::text_eval;
    // Nothing is timed here: let the allocator keep the forward's buffers (~1.5x).
    crate::memory::keep_freed_buffers();
    let started = std::time::Instant::now();
    let (p, agreement) = text_eval(
        &a.model,
        a.reference.as_deref(),
        text,
        a.tokenizer.as_deref(),
        a.window,
        a.windows,
        progress(a.quiet).as_ref(),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if !a.json {
        println!(
            "perplexity {:.3} (mean NLL {:.5} nats) over {} predicted tokens in {} windows of {} ({:.1} s)",
            p.ppl, p.mean_nll, p.tokens, p.windows, a.window, seconds
        );
        if let (Some(g), Some(r)) = (&agreement, &a.reference) {
            println!(
                "against {}: next-token agreement {:.2}%, KL(dense || model) {:.5} nats per token",
                r.display(),
                100.0 * g.top1,
                g.kl
            );
        }
    }
    let mut v = serde_json::json!({
        "text": text, "metric": "perplexity", "value": p.ppl,
        "mean_nll": p.mean_nll, "tokens": p.tokens, "windows": p.windows,
        "window": a.window, "seconds": seconds,
    });
    if let Some(g) = agreement {
        v["reference"] = serde_json::json!(a.reference);
        v["top1_agreement"] = serde_json::json!(g.top1);
        v["kl"] = serde_json::json!(g.kl);
    }
    Ok(v)
}

fn eval_probes(a: &EvalArgs, file: Option<&std::path::Path>) -> anyhow::Result<serde_json::Value> {
    use crate::backend::mistralrs::eval::probe_replies;
    use crate::data::probes::{parse_probes, DEFAULT_PROBES};
    let (text, source) = match file {
        None => (
            DEFAULT_PROBES.to_string(),
            std::path::PathBuf::from("data/probes.jsonl"),
        ),
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| crate::Error::io(file, e))?;
            (text, file.to_path_buf())
        }
    };
    let probes = parse_probes(&text, &source)?;
    let replies = probe_replies(
        &a.model,
        &probes,
        a.reply_tokens,
        progress(a.quiet).as_ref(),
    )?;
    let answered = replies.iter().filter(|r| r.answered).count();
    let mut v = serde_json::json!({
        "set": source, "questions": probes.len(), "answered": answered, "replies": replies,
    });
    if !a.json {
        println!(
            "probes ({}): {answered} of {} answered",
            source.display(),
            probes.len()
        );
        for r in &replies {
            println!(
                "  [{}] {} -> {:?}",
                if r.answered { "x" } else { " " },
                r.question,
                r.reply
            );
        }
    }
    if let Some(reference) = &a.reference {
        let dense = probe_replies(
            reference,
            &probes,
            a.reply_tokens,
            progress(a.quiet).as_ref(),
        )?;
        let by_dense = dense.iter().filter(|r| r.answered).count();
        let both = dense
            .iter()
            .zip(&replies)
            .filter(|(d, m)| d.answered && m.answered)
            .count();
        if !a.json {
            println!(
                "the reference {} answers {by_dense}; the model answers {both} of those",
                reference.display()
            );
        }
        v["reference"] = serde_json::json!(reference);
        v["reference_answered"] = serde_json::json!(by_dense);
        v["answered_of_reference"] = serde_json::json!(both);
        v["reference_replies"] = serde_json::json!(dense);
    }
    Ok(v)
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
