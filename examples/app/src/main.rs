//! Loads the model the build script pruned and runs it with tract.

use tract_onnx::prelude::*;

include!(concat!(env!("OUT_DIR"), "/ziplm_models.rs"));

fn main() -> TractResult<()> {
    let path = ziplm_models::TINY_BERT_SPEEDUP_1_3;
    let seq = 32;
    let model = tract_onnx::onnx()
        .model_for_path(path)?
        .with_input_fact(0, i64::fact([1, seq]).into())?
        .with_input_fact(1, i64::fact([1, seq]).into())?
        .with_input_fact(2, i64::fact([1, seq]).into())?
        .into_optimized()?
        .into_runnable()?;
    let ids = tract_ndarray::Array2::from_shape_fn((1, seq), |(_, j)| (j as i64 * 7) % 128).into_tensor();
    let mask = tract_ndarray::Array2::<i64>::ones((1, seq)).into_tensor();
    let types = tract_ndarray::Array2::<i64>::zeros((1, seq)).into_tensor();
    let out = model.run(tvec![ids.into(), mask.into(), types.into()])?;
    println!("pruned model {path}: output shape {:?}", out[0].shape());
    Ok(())
}
