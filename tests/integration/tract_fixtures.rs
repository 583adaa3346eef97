//! The tract backend on the five exporter fixtures: recognition, dense round trip,
//! equivalence with the masked dense model, and OBS-compensated weights landing where
//! the engine put them.

use std::path::PathBuf;
use tract_onnx::prelude::*;
use ziplm::backend::tract::model::runnable_from_bytes;
use ziplm::backend::tract::onnx::emit_masked;
use ziplm::backend::tract::{inputs, TractModel, TractOptions};
use ziplm::database::{Database, DatabaseConfig};
use ziplm::search::Selection;
use ziplm_plugin_api::*;

pub const FIXTURES: &[&str] = &[
    "tiny-bert-feature-extraction",
    "tiny-gpt2-text-generation",
    "tiny-gpt2-text-generation-with-past",
    "tiny-llama-gqa-text-generation",
    "tiny-llama-gqa-text-generation-with-past",
];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/onnx")
        .join(name)
        .join("model.onnx")
}

/// Prefill 1 x 16; the with-past exports are timed at decode-like shapes elsewhere but
/// checked here with 8 cached positions and 16 new tokens.
pub fn workload(name: &str) -> Workload {
    if name.ends_with("with-past") {
        Workload {
            batch: 1,
            seq_len: 16,
            phase: Phase::Decode { kv_len: 8 },
        }
    } else {
        Workload::prefill(1, 16)
    }
}

pub fn load(name: &str) -> TractModel {
    TractModel::load(
        &fixture(name),
        TractOptions {
            workload: workload(name),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ids(seed: u64, n: usize) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 128) as i64
        })
        .collect()
}

/// Runs ONNX bytes on a sample; returns the first output (hidden states or logits).
fn run(bytes: &[u8], w: &Workload, sample: &[i64]) -> Vec<f32> {
    let (plan, specs) = runnable_from_bytes(bytes, w).unwrap();
    let mask = vec![1i64; sample.len()];
    let inputs = inputs::build_inputs(&specs, w, sample, &mask).unwrap();
    let out = plan.run(inputs).unwrap();
    out[0]
        .cast_to::<f32>()
        .unwrap()
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn all_fixtures_are_recognised() {
    for name in FIXTURES {
        let m = load(name);
        let s = m.structure();
        assert_eq!(s.blocks.len(), 4, "{name}: {s:?}");
        let kv = if name.contains("llama") { 2 } else { 4 };
        for (i, b) in s.blocks.iter().enumerate() {
            assert_eq!(b.layer.0 as usize, i / 2, "{name}");
            assert_eq!(b.hidden, 64);
            match b.kind {
                BlockKind::Attention(a) => {
                    assert_eq!(i % 2, 0, "{name}");
                    assert_eq!((a.n_heads, a.n_kv_heads, a.head_dim), (4, kv, 16), "{name}");
                }
                BlockKind::Ffn(f) => {
                    assert_eq!(i % 2, 1, "{name}");
                    assert_eq!((f.width, f.gated), (128, name.contains("llama")), "{name}");
                }
            }
        }
        assert_eq!(m.vocab(), Some(128), "{name}");
    }
}

#[test]
fn dense_plan_reproduces_the_original() {
    for name in FIXTURES {
        let m = load(name);
        let plan = Plan::dense(m.structure());
        let bytes =
            ziplm::backend::tract::onnx::emit(&m, &plan, &PrunedWeights::default()).unwrap();
        let w = workload(name);
        let sample = ids(1, 16);
        let original = std::fs::read(fixture(name)).unwrap();
        let d = max_abs_diff(&run(&bytes, &w, &sample), &run(&original, &w, &sample));
        assert!(d <= 1e-5, "{name}: max abs diff {d}");
    }
}

/// A plan that removes heads and neurons (and one whole FFN in layer 1).
fn some_plan(m: &TractModel) -> Plan {
    let mut plan = Plan::dense(m.structure());
    for bp in plan.blocks.iter_mut() {
        match bp.kind {
            BlockKind::Attention(a) => {
                if a.n_kv_heads < a.n_heads {
                    // Whole KV group 0 removed: heads 0,1 and KV head 0.
                    bp.kept = vec![2, 3];
                    bp.kept_kv_heads = vec![1];
                } else {
                    bp.kept = vec![0, 2, 3];
                    bp.kept_kv_heads = vec![0, 2, 3];
                }
            }
            BlockKind::Ffn(_) => {
                bp.kept = if bp.block.0 == 3 {
                    vec![]
                } else {
                    (0..128).filter(|j| j % 3 != 1).collect()
                };
            }
        }
    }
    plan
}

#[test]
fn pruning_without_update_equals_the_masked_dense_model() {
    for name in FIXTURES {
        let m = load(name);
        let plan = some_plan(&m);
        plan.validate_for(m.structure()).unwrap();
        let pruned = ziplm::backend::tract::onnx::emit(&m, &plan, &PrunedWeights::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let masked = emit_masked(&m, &plan).unwrap();
        let w = workload(name);
        for seed in 0..3 {
            let sample = ids(10 + seed, 16);
            let d = max_abs_diff(&run(&pruned, &w, &sample), &run(&masked, &w, &sample));
            assert!(d <= 1e-4, "{name}: max abs diff {d}");
        }
        assert!(
            pruned.len() < std::fs::read(fixture(name)).unwrap().len(),
            "{name}: the pruned file is not smaller"
        );
    }
}

#[test]
fn gqa_equal_heads_per_group_equals_the_masked_model() {
    for name in FIXTURES.iter().filter(|n| n.contains("llama")) {
        let m = load(name);
        let mut plan = Plan::dense(m.structure());
        for bp in plan.blocks.iter_mut() {
            if let BlockKind::Attention(_) = bp.kind {
                // One query head kept in each KV group: the repeat factor goes 2 -> 1.
                bp.kept = if bp.block.0 == 0 {
                    vec![1, 2]
                } else {
                    vec![0, 3]
                };
                bp.kept_kv_heads = vec![0, 1];
            }
        }
        let pruned =
            ziplm::backend::tract::onnx::emit(&m, &plan, &PrunedWeights::default()).unwrap();
        let masked = emit_masked(&m, &plan).unwrap();
        let w = workload(name);
        let sample = ids(7, 16);
        let d = max_abs_diff(&run(&pruned, &w, &sample), &run(&masked, &w, &sample));
        assert!(d <= 1e-4, "{name}: max abs diff {d}");
    }
}

#[test]
fn obs_weights_land_where_the_engine_computed_them() {
    for name in FIXTURES {
        let mut m = load(name);
        m.set_calibration((0..16).map(|s| ids(100 + s, 16)).collect())
            .unwrap();
        let db =
            Database::build(&mut m, &DatabaseConfig::default(), &ziplm::progress::Quiet).unwrap();
        // Second level of every block (one head / KV group or 32 neurons fewer).
        let selection = Selection {
            levels: db.blocks.iter().map(|_| 1).collect(),
        };
        let plan = db.plan(&selection).unwrap();
        let weights = db.pruned_weights(&selection).unwrap();
        let bytes = ziplm::backend::tract::onnx::emit(&m, &plan, &weights).unwrap();
        // Load the emitted model, recognise it again and read its out-projections.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pruned.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let pruned = TractModel::load(
            &path,
            TractOptions {
                workload: workload(name),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: emitted model does not load: {e}"));
        for (bi, bp) in plan.blocks.iter().enumerate() {
            let got = pruned.out_projection(BlockId(bi as u32)).unwrap();
            let want = &weights.out_projections[&bp.block];
            assert_eq!(
                (got.rows, got.cols),
                (want.rows, want.cols),
                "{name} block {bi}"
            );
            let d = max_abs_diff(&got.data, &want.data);
            assert!(d == 0.0, "{name} block {bi}: emitted weights differ by {d}");
            // The error of these weights on the calibration statistics is the level's.
            let b = &db.blocks[bi];
            let kept = bp.kept_columns();
            let n = b.layer.n_inputs();
            let mut full = faer::Mat::<f64>::zeros(b.layer.n_outputs(), n);
            for (a, &c) in kept.iter().enumerate() {
                for r in 0..got.rows {
                    full[(r, c)] = got.data[r * got.cols + a] as f64;
                }
            }
            let delta =
                faer::Mat::from_fn(full.nrows(), n, |i, j| full[(i, j)] - b.layer.w[(i, j)]);
            let mut hd = faer::Mat::<f64>::zeros(delta.nrows(), n);
            // Undampened H = dampened - lambda I.
            let mut h = b.layer.h.clone();
            for j in 0..n {
                h[(j, j)] -= b.layer.lambda;
            }
            faer::linalg::matmul::matmul(
                hd.as_mut(),
                faer::Accum::Replace,
                delta.as_ref(),
                h.as_ref(),
                1.0,
                faer::Par::Seq,
            );
            let err: f64 = (0..n)
                .map(|j| {
                    (0..delta.nrows())
                        .map(|i| hd[(i, j)] * delta[(i, j)])
                        .sum::<f64>()
                })
                .sum::<f64>()
                / b.layer.energy;
            let predicted = b.levels[1].error;
            assert!(
                (err - predicted).abs() <= 1e-5 * predicted.max(1e-3),
                "{name} block {bi}: {err} vs {predicted}"
            );
        }
    }
}

/// Exports pruned fixture models with their inputs and tract's outputs for
/// `scripts/check_onnxruntime.py` (run by `.ci/run`). Writes nothing unless
/// `ZIPLM_ORT_DIR` is set.
#[test]
fn tract_ort_export() {
    let Some(dir) = std::env::var_os("ZIPLM_ORT_DIR") else {
        eprintln!("skipped: set ZIPLM_ORT_DIR to export pruned models for the onnxruntime check");
        return;
    };
    let dir = PathBuf::from(dir);
    for name in FIXTURES {
        let mut m = load(name);
        m.set_calibration((0..16).map(|s| ids(300 + s, 16)).collect())
            .unwrap();
        let db =
            Database::build(&mut m, &DatabaseConfig::default(), &ziplm::progress::Quiet).unwrap();
        let mut levels: Vec<usize> = db.blocks.iter().map(|_| 1).collect();
        levels[1] = db.blocks[1].levels.len() - 1; // remove the first FFN
        let selection = Selection { levels };
        let plan = db.plan(&selection).unwrap();
        let weights = db.pruned_weights(&selection).unwrap();
        let bytes = ziplm::backend::tract::onnx::emit(&m, &plan, &weights).unwrap();
        let w = workload(name);
        let sample = ids(42, w.batch * w.seq_len);
        let (plan_r, specs) = runnable_from_bytes(&bytes, &w).unwrap();
        let mask = vec![1i64; sample.len()];
        let tensors = inputs::build_inputs(&specs, &w, &sample, &mask).unwrap();
        let out = plan_r.run(tensors.clone()).unwrap();
        let out0 = out[0].cast_to::<f32>().unwrap();
        let view = out0.to_plain_array_view::<f32>().unwrap();
        let mut ins = vec![];
        for (spec, t) in specs.iter().zip(&tensors) {
            let (dtype, data): (&str, Vec<f64>) = if t.datum_type() == i64::datum_type() {
                (
                    "int64",
                    t.to_plain_array_view::<i64>()
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect(),
                )
            } else {
                (
                    "float32",
                    t.cast_to::<f32>()
                        .unwrap()
                        .to_plain_array_view::<f32>()
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect(),
                )
            };
            ins.push(serde_json::json!({ "name": spec.name, "dtype": dtype, "shape": t.shape(), "data": data }));
        }
        let case = dir.join(name);
        std::fs::create_dir_all(&case).unwrap();
        std::fs::write(case.join("model.onnx"), &bytes).unwrap();
        let json = serde_json::json!({
            "inputs": ins,
            "output": view.iter().copied().collect::<Vec<f32>>(),
            "output_shape": view.shape(),
        });
        std::fs::write(case.join("case.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    }
}

#[test]
fn nnef_archive_of_a_pruned_model_runs_like_its_onnx() {
    use ziplm::backend::tract::nnef;
    for name in FIXTURES {
        let m = load(name);
        let plan = some_plan(&m);
        let onnx_bytes =
            ziplm::backend::tract::onnx::emit(&m, &plan, &PrunedWeights::default()).unwrap();
        let w = workload(name);
        let tar = nnef::to_nnef(&onnx_bytes, &w).unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = nnef::framework()
            .model_for_read(&mut &tar[..])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let runnable = model.into_optimized().unwrap().into_runnable().unwrap();
        let (_, specs) = runnable_from_bytes(&onnx_bytes, &w).unwrap();
        let sample = ids(3, 16);
        let mask = vec![1i64; sample.len()];
        let out = runnable
            .run(inputs::build_inputs(&specs, &w, &sample, &mask).unwrap())
            .unwrap();
        let got: Vec<f32> = out[0]
            .cast_to::<f32>()
            .unwrap()
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let d = max_abs_diff(&got, &run(&onnx_bytes, &w, &sample));
        assert!(d <= 1e-5, "{name}: NNEF vs ONNX max abs diff {d}");
    }
}

/// A model ziplm pruned to one head in a layer is one ziplm reads again and re-prunes
/// (issue 16, item 6: its head split is decluttered into a new axis, not a reshape).
#[test]
fn a_model_pruned_to_one_head_per_layer_is_read_and_pruned_again() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES.iter().filter(|n| !n.contains("llama")) {
        let m = load(name);
        let mut plan = Plan::dense(m.structure());
        for bp in plan.blocks.iter_mut() {
            if let BlockKind::Attention(_) = bp.kind {
                bp.kept = vec![2];
                bp.kept_kv_heads = vec![2];
            }
        }
        let bytes =
            ziplm::backend::tract::onnx::emit(&m, &plan, &PrunedWeights::default()).unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, &bytes).unwrap();
        let w = workload(name);
        let again = TractModel::load(
            &path,
            TractOptions {
                workload: w,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for b in &again.structure().blocks {
            if let BlockKind::Attention(a) = b.kind {
                assert_eq!((a.n_heads, a.head_dim), (1, 16), "{name}");
            }
        }
        // Pruned again (FFN neurons): the same as pruning the one-head model's masked
        // dense form.
        let mut plan2 = Plan::dense(again.structure());
        for bp in plan2.blocks.iter_mut() {
            if let BlockKind::Ffn(_) = bp.kind {
                bp.kept = (0..128).filter(|j| j % 2 == 0).collect();
            }
        }
        let twice =
            ziplm::backend::tract::onnx::emit(&again, &plan2, &PrunedWeights::default()).unwrap();
        let sample = ids(3, 16);
        let out = run(&twice, &w, &sample);
        assert!(out.iter().all(|v| v.is_finite()), "{name}");
        let dense_again = ziplm::backend::tract::onnx::emit(
            &again,
            &Plan::dense(again.structure()),
            &PrunedWeights::default(),
        )
        .unwrap();
        let d = max_abs_diff(&run(&dense_again, &w, &sample), &run(&bytes, &w, &sample));
        assert!(d <= 1e-5, "{name}: the re-read model differs by {d}");
    }
}

/// Sequential correction (ZIPLM.md section 8) through the tract streams, on every
/// fixture: with only the last block pruned (its inputs are the dense ones), the stage
/// gives the database's plan and weights; with every block pruned, the corrected
/// pre-LN models are closer to the dense one on the calibration samples than the
/// dense-input OBS weights, at the same shapes (the post-LN BERT about even), and each
/// is a model tract runs.
#[test]
fn sequential_correction_lowers_the_end_to_end_error() {
    use ziplm::pipeline::correct::{correct, SequentialTarget::*};
    let mut results = vec![];
    for name in FIXTURES {
        let mut m = load(name);
        let samples: Vec<Vec<i64>> = (0..64).map(|s| ids(300 + s, 16)).collect();
        m.set_calibration(samples.clone()).unwrap();
        let db =
            Database::build(&mut m, &DatabaseConfig::default(), &ziplm::progress::Quiet).unwrap();
        let quiet = &ziplm::progress::Quiet;
        let last = db.blocks.len() - 1;

        let mut levels = vec![0; db.blocks.len()];
        levels[last] = 1;
        let selection = Selection { levels };
        let (plan, weights) = correct(&m, &db, &selection, 0.01, Output, false, quiet).unwrap();
        assert_eq!(plan, db.plan(&selection).unwrap(), "{name}");
        let id = plan.blocks[last].block;
        let want = &db.pruned_weights(&selection).unwrap().out_projections[&id];
        let scale = want.data.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = max_abs_diff(&weights.out_projections[&id].data, &want.data);
        assert!(d <= 1e-4 * scale, "{name}: last block differs by {d}");

        let selection = Selection {
            levels: db.blocks.iter().map(|b| (b.levels.len() - 1) / 2).collect(),
        };
        let obs_plan = db.plan(&selection).unwrap();
        let obs = db.pruned_weights(&selection).unwrap();
        let (seq_plan, seq) = correct(&m, &db, &selection, 0.01, Output, false, quiet).unwrap();
        for (a, b) in seq_plan.blocks.iter().zip(&obs_plan.blocks) {
            assert_eq!(a.kept.len(), b.kept.len(), "{name}: shapes are the plan's");
            assert_eq!(a.kept_kv_heads.len(), b.kept_kv_heads.len(), "{name}");
        }
        let dense = m.file().to_bytes();
        // Scored at the prefill workload the calibration ran at.
        let w = Workload::prefill(1, 16);
        let error = |plan: &Plan, weights: &PrunedWeights| {
            let bytes = ziplm::backend::tract::onnx::emit(&m, plan, weights).unwrap();
            samples
                .iter()
                .map(|s| {
                    let (a, b) = (run(&dense, &w, s), run(&bytes, &w, s));
                    a.iter()
                        .zip(&b)
                        .map(|(x, y)| ((x - y) as f64).powi(2))
                        .sum::<f64>()
                })
                .sum::<f64>()
        };
        let (e_obs, e_seq) = (error(&obs_plan, &obs), error(&seq_plan, &seq));
        let (drift_plan, drift) =
            correct(&m, &db, &selection, 0.01, Residual, false, quiet).unwrap();
        let e_drift = error(&drift_plan, &drift);
        // Keeping the database's choice: the very heads and neurons, re-fitted.
        let (keep_plan, keep) = correct(&m, &db, &selection, 0.01, Residual, true, quiet).unwrap();
        for (a, b) in keep_plan.blocks.iter().zip(&obs_plan.blocks) {
            assert_eq!(a.kept, b.kept, "{name}: the database's choice is kept");
            assert_eq!(a.kept_kv_heads, b.kept_kv_heads, "{name}");
        }
        let e_keep = error(&keep_plan, &keep);
        assert!(e_keep.is_finite(), "{name}: {e_keep}");
        eprintln!("{name}: end-to-end error, dense-input OBS {e_obs:.5}, sequential {e_seq:.5}, cancelling the drift {e_drift:.5}, keeping the choice {e_keep:.5}");
        results.push((name, e_obs, e_seq, e_drift, e_keep));
    }
    for (name, e_obs, e_seq, e_drift, e_keep) in results {
        assert!(
            e_drift < e_obs,
            "{name}: residual target {e_drift} vs OBS {e_obs}"
        );
        assert!(
            e_keep < e_obs,
            "{name}: residual target keeping the choice {e_keep} vs OBS {e_obs}"
        );
        if name.contains("bert") {
            // Post-LN: each sum is normalised, and the target `W X` does not cancel the
            // drift the residual passes on (ZIPLM.md section 8's variant would); here
            // the correction is about even (measured: 0.7347 against 0.7305).
            assert!(
                e_seq < 1.02 * e_obs,
                "{name}: sequential {e_seq} vs OBS {e_obs}"
            );
        } else {
            assert!(e_seq < e_obs, "{name}: sequential {e_seq} vs OBS {e_obs}");
        }
    }
}
