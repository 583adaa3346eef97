//! all-MiniLM-L6-v2 on this CPU: prune to speedup targets with tract, then compare STS-B
//! dev quality of the dense model, ZipLM (OBS), and a magnitude baseline (same
//! per-layer shapes, heads/neurons chosen by weight norm, no OBS update).
//!
//! ```sh
//! cargo run --release --example minilm_sts -- [OUT_DIR] [SPEEDUPS...]
//! ```
//! Needs `$ZIPLM_SHARED` (default `../shared`) with the model and STS Benchmark.
//! Writes `OUT_DIR/minilm_sts.json` and prints a markdown table.

use std::path::PathBuf;
use std::time::Instant;
use ziplm::backend::tract::encode::SentenceEncoder;
use ziplm::backend::tract::{driver, onnx, profile::time_pair};
use ziplm::data::{sts, tokenizer::Tokenizer, CalibrationData, DataFormat};
use ziplm::job::PruneJob;
use ziplm::search::Budget;
use ziplm_plugin_api::PrunedWeights;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "target/minilm-sts".into()));
    let speedups: Vec<f64> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let speedups = if speedups.is_empty() { vec![1.5, 2.0] } else { speedups };
    let shared = PathBuf::from(std::env::var("ZIPLM_SHARED").unwrap_or_else(|_| "../shared".into()));
    let model = shared.join("models/all-MiniLM-L6-v2-onnx/model.onnx");
    if !model.exists() {
        eprintln!("skipped: {} not found (set ZIPLM_SHARED)", model.display());
        return Ok(());
    }
    std::fs::create_dir_all(&out)?;
    let mut job = PruneJob::new(&model);
    job.budgets = speedups.iter().map(|&s| Budget::Speedup(s)).collect();
    job.calibration = Some(CalibrationData {
        path: shared.join("data/stsbenchmark/sts-train.csv"),
        format: Some(DataFormat::StsTsv),
        samples: 2048,
        seq_len: 128,
    });
    job.out_dir = out.clone();
    job.latency_table = Some(out.join("latency-table.json"));
    let t = Instant::now();
    let run = driver::run(&job, &ziplm::progress::Bars::default())?;
    let prune_s = t.elapsed().as_secs_f64();
    println!("{}", run.report.to_text());

    let tok = Tokenizer::from_file(&model.with_file_name("tokenizer.json"))?;
    let pairs = sts::read_pairs(&shared.join("data/stsbenchmark/sts-dev.csv"))?;
    let score = |bytes: &[u8]| -> anyhow::Result<f64> {
        let enc = SentenceEncoder::new(bytes, 16, 128)?;
        Ok(sts::evaluate(&pairs, &mut |s: &[String]| enc.embed(&tok, s))?)
    };
    let dense = score(&std::fs::read(&model)?)?;
    let mut rows = vec![];
    for outcome in &run.outcomes {
        let zipl = score(&std::fs::read(&outcome.emitted.path)?)?;
        let mplan = ziplm::baselines::magnitude_plan(&run.database, &outcome.search.selection)?;
        let mag_path = outcome.emitted.path.with_extension("magnitude.onnx");
        std::fs::write(&mag_path, onnx::emit(&run.model, &mplan, &PrunedWeights::default())?)?;
        let mag = score(&std::fs::read(&mag_path)?)?;
        let (d, m) = time_pair(&run.model, &model, &mag_path, &job.workload, 1, &job.verify_settings)?;
        let last = outcome.attempts.last().unwrap();
        let (zd, zm) = (last.measured_dense.unwrap(), last.measured.unwrap());
        rows.push(serde_json::json!({
            "target": outcome.budget,
            "ziplm": { "measured_ms": zm.median_ms, "dense_ms": zd.median_ms, "speedup": zd.median_ms / zm.median_ms, "sts": zipl,
                       "layers": ziplm::report::layer_shapes(&run.database, outcome) },
            "magnitude": { "measured_ms": m.median_ms, "dense_ms": d.median_ms, "speedup": d.median_ms / m.median_ms, "sts": mag },
        }));
    }
    let result = serde_json::json!({ "dense_sts": dense, "prune_seconds": prune_s, "report": run.report, "rows": rows });
    std::fs::write(out.join("minilm_sts.json"), serde_json::to_vec_pretty(&result)?)?;
    println!("\n| target | ZipLM speedup (measured) | ZipLM STS-B | magnitude speedup | magnitude STS-B |");
    println!("|---|---|---|---|---|");
    println!("| dense | 1.00x | {dense:.2} | 1.00x | {dense:.2} |");
    for r in &rows {
        println!(
            "| {} | {:.2}x | {:.2} | {:.2}x | {:.2} |",
            r["target"], r["ziplm"]["speedup"].as_f64().unwrap(), r["ziplm"]["sts"].as_f64().unwrap(),
            r["magnitude"]["speedup"].as_f64().unwrap(), r["magnitude"]["sts"].as_f64().unwrap()
        );
    }
    Ok(())
}
