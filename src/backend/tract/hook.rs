//! The `ziplm` tract transform: ship the original ONNX and a plan bundle, prune while
//! loading.
//!
//! ```no_run
//! use tract_onnx::prelude::*;
//! # fn main() -> TractResult<()> {
//! // Linking ziplm registers the transform in tract's registry.
//! let transform = ziplm::backend::tract::hook::transform_for("pruned.plan-bundle.json")?;
//! let model = tract_onnx::onnx()
//!     .model_for_path("model.onnx")?
//!     .with_input_fact(0, i64::fact([1, 128]).into())?
//!     // ... the other inputs
//!     .into_typed()?;
//! let pruned = transform.transform_into(model)?;
//! # Ok(()) }
//! ```
//!
//! The bundle is `NAME.json` (the plan, per-block bypass policy, and an index of the
//! compensated weights) plus `NAME.bin` (the weights, little-endian f32). It is what
//! `ziplm prune` writes next to each emitted model; applying it gives the same model
//! as the emitted ONNX.

use super::recognize;
use super::surgery::{self, BlockEdit};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{anyhow, bail, TractErrorContext};
use tract_onnx::tract_core::transform::ModelTransform;
use ziplm_plugin_api::{BlockId, Plan, PrunedWeights, WeightMatrix, FORMAT_VERSION};

/// Index entry of one compensated matrix in the `.bin` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleWeight {
    /// The block.
    pub block: BlockId,
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (kept inputs).
    pub cols: usize,
    /// Offset in f32 values.
    pub offset: usize,
}

/// A plan with what the transform needs to reproduce the emitted model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanBundle {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The plan.
    pub plan: Plan,
    /// Per block: a removed block keeps its out-projection bias (post-LN models).
    pub keep_bias_when_removed: Vec<bool>,
    /// The compensated weights' index.
    pub weights: Vec<BundleWeight>,
    /// The weights file, relative to the bundle.
    pub weights_file: String,
}

/// Writes `path` (JSON) and its `.bin` atomically.
pub fn write_bundle(
    path: &Path,
    plan: &Plan,
    weights: &PrunedWeights,
    keep_bias: Vec<bool>,
) -> crate::Result<()> {
    super::onnx::edit::refuse_other_tensors(weights)?;
    let bin = path.with_extension("bin");
    let mut index = vec![];
    let mut offset = 0;
    for (b, w) in &weights.out_projections {
        index.push(BundleWeight {
            block: *b,
            rows: w.rows,
            cols: w.cols,
            offset,
        });
        offset += w.data.len();
    }
    crate::fsutil::write_atomic_with(&bin, |f| {
        let mut buf = std::io::BufWriter::new(f);
        for w in weights.out_projections.values() {
            for v in &w.data {
                buf.write_all(&v.to_le_bytes())?;
            }
        }
        buf.flush()
    })?;
    let bundle = PlanBundle {
        format_version: FORMAT_VERSION,
        plan: plan.clone(),
        keep_bias_when_removed: keep_bias,
        weights: index,
        weights_file: bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string(),
    };
    crate::fsutil::write_json_atomic(path, &bundle)
}

/// Reads a bundle and its weights.
pub fn read_bundle(path: &Path) -> TractResult<(PlanBundle, PrunedWeights)> {
    let bundle: PlanBundle = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a ziplm plan bundle", path.display()))?;
    if bundle.format_version != FORMAT_VERSION {
        bail!(
            "{}: bundle format {} is not the supported {FORMAT_VERSION}",
            path.display(),
            bundle.format_version
        );
    }
    let bin_path = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(&bundle.weights_file);
    let bytes =
        std::fs::read(&bin_path).with_context(|| format!("reading {}", bin_path.display()))?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut weights = PrunedWeights::default();
    for w in &bundle.weights {
        let end = w
            .rows
            .checked_mul(w.cols)
            .and_then(|n| n.checked_add(w.offset));
        let data = end
            .and_then(|end| values.get(w.offset..end))
            .with_context(|| {
                format!(
                    "{}: weights of {} ({} x {} at {}) lie beyond its end",
                    bin_path.display(),
                    w.block,
                    w.rows,
                    w.cols,
                    w.offset
                )
            })?;
        weights.out_projections.insert(
            w.block,
            WeightMatrix {
                rows: w.rows,
                cols: w.cols,
                data: data.to_vec(),
            },
        );
    }
    Ok((bundle, weights))
}

/// The transform's parameters (`{ plan = "path/to/bundle.json" }` in tract configs).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ZiplmTransformConfig {
    /// The plan bundle.
    #[serde(default)]
    pub plan: Option<PathBuf>,
}

/// Applies a plan bundle to a typed model.
#[derive(Debug)]
pub struct ZiplmTransform {
    bundle: Option<(PlanBundle, PrunedWeights)>,
}

impl ZiplmTransform {
    /// From the transform's parameters.
    pub fn new(config: ZiplmTransformConfig) -> TractResult<ZiplmTransform> {
        Ok(ZiplmTransform {
            bundle: config.plan.as_deref().map(read_bundle).transpose()?,
        })
    }
}

impl ModelTransform for ZiplmTransform {
    fn name(&self) -> std::borrow::Cow<'static, str> {
        "ziplm".into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let Some((bundle, weights)) = &self.bundle else {
            bail!("the ziplm transform needs a plan: {{ name = \"ziplm\", plan = \"model.speedup-1.5.plan-bundle.json\" }}");
        };
        let decluttered = model.clone().into_decluttered()?;
        let blocks = recognize::recognize(&decluttered)?;
        if blocks.len() != bundle.plan.blocks.len() {
            bail!(
                "the plan has {} blocks, the model {}",
                bundle.plan.blocks.len(),
                blocks.len()
            );
        }
        let mut edits = vec![];
        for (i, (b, bp)) in blocks.iter().zip(&bundle.plan.blocks).enumerate() {
            edits.push(BlockEdit {
                block: b,
                plan: bp,
                weights: weights.out_projections.get(&bp.block),
                keep_bias_when_removed: bundle
                    .keep_bias_when_removed
                    .get(i)
                    .copied()
                    .unwrap_or(false),
            });
        }
        *model = surgery::apply(&decluttered, &edits)?;
        Ok(())
    }
}

tract_onnx::tract_core::register_model_transform!("ziplm", ZiplmTransformConfig, |config| Ok(
    Box::new(ZiplmTransform::new(config)?)
));

/// The registered `ziplm` transform for a bundle (what tract's registry returns for
/// `{ name = "ziplm", plan = ... }`).
pub fn transform_for(bundle: impl AsRef<Path>) -> TractResult<Box<dyn ModelTransform>> {
    let json = serde_json::json!({ "plan": bundle.as_ref() });
    let mut de = <dyn erased_serde::Deserializer>::erase(json);
    tract_onnx::tract_core::transform::get_transform_with_params("ziplm", &mut de)?.ok_or_else(
        || anyhow!("the ziplm transform is not registered (is the ziplm crate linked?)"),
    )
}
