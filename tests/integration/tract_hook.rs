//! The `ziplm` tract transform gives the same model as the emitted ONNX.

use super::tract_fixtures::{fixture, load, workload, FIXTURES};
use tract_onnx::prelude::*;
use ziplm::backend::tract::hook::{transform_for, write_bundle};
use ziplm::backend::tract::{inputs, onnx};
use ziplm::database::{Database, DatabaseConfig};
use ziplm::search::Selection;

fn outputs(
    model: TypedModel,
    specs: &[inputs::InputSpec],
    w: &ziplm_plugin_api::Workload,
    ids: &[i64],
) -> Vec<f32> {
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    let mask = vec![1i64; ids.len()];
    let out = plan
        .run(inputs::build_inputs(specs, w, ids, &mask).unwrap())
        .unwrap();
    out[0]
        .cast_to::<f32>()
        .unwrap()
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn transform_equals_emitted_onnx() {
    for name in FIXTURES {
        let mut m = load(name);
        m.set_calibration(ziplm::data::random_samples(128, 16, 16, 3))
            .unwrap();
        let db =
            Database::build(&mut m, &DatabaseConfig::default(), &ziplm::progress::Quiet).unwrap();
        // Prune every block one level, and remove the last FFN entirely.
        for remove_last in [false, true] {
            let mut levels: Vec<usize> = db.blocks.iter().map(|_| 1).collect();
            let last = levels.len() - 1;
            if remove_last {
                levels[last] = db.blocks[last].levels.len() - 1;
            }
            let selection = Selection { levels };
            let plan = db.plan(&selection).unwrap();
            let weights = db.pruned_weights(&selection).unwrap();
            let emitted = onnx::emit(&m, &plan, &weights).unwrap();

            let dir = tempfile::tempdir().unwrap();
            let bundle = dir.path().join("plan-bundle.json");
            write_bundle(
                &bundle,
                &plan,
                &weights,
                onnx::keeps_bias_when_removed(&m).unwrap(),
            )
            .unwrap();
            let transform = transform_for(&bundle).unwrap();

            let w = workload(name);
            // Original file + transform at load time.
            let mut original = tract_onnx::onnx().model_for_path(fixture(name)).unwrap();
            inputs::set_input_facts(&mut original, m.input_specs(), &w).unwrap();
            let hooked = transform
                .transform_into(original.into_typed().unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            // Emitted file.
            let (emitted_model, emitted_specs) = {
                let file =
                    onnx::OnnxFile::from_bytes(&emitted, std::path::Path::new("x.onnx")).unwrap();
                let inf = file.inference_model().unwrap();
                let specs = inputs::input_specs(&inf).unwrap();
                let mut inf = inf;
                inputs::set_input_facts(&mut inf, &specs, &w).unwrap();
                (inf.into_typed().unwrap(), specs)
            };
            let ids: Vec<i64> = (0..w.batch * w.seq_len)
                .map(|i| (i * 37 % 128) as i64)
                .collect();
            let a = outputs(hooked, &emitted_specs, &w, &ids);
            let b = outputs(emitted_model, &emitted_specs, &w, &ids);
            assert_eq!(a.len(), b.len(), "{name}");
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                d <= 1e-5,
                "{name} (last FFN removed: {remove_last}): transform vs emitted max abs diff {d}"
            );
        }
    }
}
