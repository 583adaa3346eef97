//! Loads the model the build script pruned and runs it with tract.

use tract_onnx::prelude::*;

include!(concat!(env!("OUT_DIR"), "/ziplm_models.rs"));

/// Sequence length of the workload declared in Cargo.toml.
const SEQ: usize = 32;

/// Loads the pruned model and runs it on one sequence; returns the output shape.
fn run(path: &str) -> TractResult<Vec<usize>> {
    let model = tract_onnx::onnx()
        .model_for_path(path)?
        .with_input_fact(0, i64::fact([1, SEQ]).into())?
        .with_input_fact(1, i64::fact([1, SEQ]).into())?
        .with_input_fact(2, i64::fact([1, SEQ]).into())?
        .into_optimized()?
        .into_runnable()?;
    let ids =
        tract_ndarray::Array2::from_shape_fn((1, SEQ), |(_, j)| (j as i64 * 7) % 128).into_tensor();
    let mask = tract_ndarray::Array2::<i64>::ones((1, SEQ)).into_tensor();
    let types = tract_ndarray::Array2::<i64>::zeros((1, SEQ)).into_tensor();
    let out = model.run(tvec![ids.into(), mask.into(), types.into()])?;
    Ok(out[0].shape().to_vec())
}

fn main() -> TractResult<()> {
    let path = ziplm_models::TINY_BERT_SPEEDUP_1_3;
    println!("pruned model {path}: output shape {:?}", run(path)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The build script pruned the model into OUT_DIR and tract runs it
    /// (`cargo test --workspace` runs this with the workspace's dependencies).
    #[test]
    fn the_pruned_model_loads_and_runs() {
        let shape = super::run(super::ziplm_models::TINY_BERT_SPEEDUP_1_3).unwrap();
        assert_eq!(shape, vec![1, super::SEQ, 64]);
    }
}
