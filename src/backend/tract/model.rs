//! [`TractModel`]: a loaded ONNX transformer as a [`ModelAdapter`].

use super::inputs::{self, InputRole, InputSpec};
use super::onnx::{self, OnnxFile};
use super::recognize::{self, RecognizedBlock, RecognizedKind};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, DimLike, TractErrorContext};
use ziplm_plugin_api::{
    ActivationSink, AdapterError, AdapterResult, AttentionShape, BlockId, BlockKind, EmitSummary,
    FfnShape, GqaPolicy, LayerIndex, ModelAdapter, ModelStructure, ModuleRemoval, Phase, Plan,
    PrunableBlock, PrunedWeights, ShapeConstraints, WeightMatrix, Workload,
};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct TractOptions {
    /// The workload the model is served at (input shapes are made concrete from it).
    pub workload: Workload,
    /// How GQA heads are removed.
    pub gqa_policy: GqaPolicy,
}

impl Default for TractOptions {
    fn default() -> Self {
        TractOptions {
            workload: Workload::prefill(1, 128),
            gqa_policy: GqaPolicy::WholeKvGroups,
        }
    }
}

/// A loaded ONNX transformer: the original file, its decluttered graph at the workload,
/// and the recognised blocks.
pub struct TractModel {
    path: PathBuf,
    file: OnnxFile,
    options: TractOptions,
    inputs: Vec<InputSpec>,
    typed: TypedModel,
    blocks: Vec<RecognizedBlock>,
    structure: ModelStructure,
    vocab: Option<usize>,
    calibration: Vec<Vec<i64>>,
}

fn runtime(context: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::runtime(context, e)
}

/// Parses, sets the workload's input facts and declutters.
pub(crate) fn typed_at(
    file: &OnnxFile,
    specs: &[InputSpec],
    workload: &Workload,
) -> TractResult<TypedModel> {
    let mut model = file.inference_model()?;
    inputs::set_input_facts(&mut model, specs, workload)?;
    model.into_typed()?.into_decluttered()
}

/// Checks a workload against what the model can take, before tract analyses the graph
/// at it (whose errors would name a reshape, not the workload).
fn check_workload(
    path: &Path,
    file: &OnnxFile,
    specs: &[InputSpec],
    workload: &Workload,
) -> AdapterResult<()> {
    let has_past = specs
        .iter()
        .any(|s| matches!(s.role, inputs::InputRole::Past { .. }));
    if matches!(workload.phase, ziplm_plugin_api::Phase::Decode { .. }) && !has_past {
        return Err(AdapterError::InvalidRequest(format!(
            "{} takes no KV cache (no past_key_values inputs), so it cannot be timed at a decode workload: use a prefill workload (no --decode-kv-len), or export the model with its past (optimum's `text-generation-with-past`)",
            path.display()
        )));
    }
    let tokens = workload.seq_len + inputs::past_len(workload);
    if let Some(positions) = file.max_positions() {
        if tokens > positions {
            return Err(AdapterError::InvalidRequest(format!(
                "the workload needs {tokens} positions and {} has {positions} (its position-embedding table): lower --seq-len (or workload.seq_len / kv_len) to at most {positions} tokens in all",
                path.display()
            )));
        }
    }
    Ok(())
}

impl TractModel {
    /// Loads `path`, makes the inputs concrete for the workload and recognises the
    /// prunable blocks.
    pub fn load(path: &Path, options: TractOptions) -> AdapterResult<TractModel> {
        options
            .workload
            .validate()
            .map_err(AdapterError::InvalidRequest)?;
        let file = OnnxFile::read(path)?;
        let inference = file
            .inference_model()
            .map_err(|e| AdapterError::InvalidModel {
                path: path.into(),
                detail: format!("{e:#}"),
            })?;
        let specs = inputs::input_specs(&inference).map_err(|e| AdapterError::Unsupported {
            what: "model inputs".into(),
            detail: format!("{e:#}"),
            hint: "export the model with the Hugging Face exporter (optimum)".into(),
        })?;
        check_workload(path, &file, &specs, &options.workload)?;
        let typed =
            typed_at(&file, &specs, &options.workload).map_err(|e| AdapterError::InvalidModel {
                path: path.into(),
                detail: format!(
                    "tract cannot analyse the graph at {}: {e:#}",
                    options.workload
                ),
            })?;
        let blocks = recognize::recognize(&typed).map_err(|e| AdapterError::Unsupported {
            what: "graph".into(),
            detail: format!("{e:#}"),
            hint: "ziplm recognises BERT, GPT-2 and Llama style blocks as exported by optimum"
                .into(),
        })?;
        if blocks.is_empty() {
            return Err(AdapterError::Unsupported {
                what: "graph".into(),
                detail: format!("{}: no transformer block found (no attention with Q/K/V/out projections, no FFN)", path.display()),
                hint: "ziplm prunes transformer encoders and decoders exported by the Hugging Face exporter".into(),
            });
        }
        let structure = structure_of(&blocks, &options, &file)?;
        let vocab = vocab_size(&typed);
        Ok(TractModel {
            path: path.into(),
            file,
            options,
            inputs: specs,
            typed,
            blocks,
            structure,
            vocab,
            calibration: vec![],
        })
    }

    /// The ONNX file this model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recognised blocks, in [`ModelStructure`] order.
    pub fn blocks(&self) -> &[RecognizedBlock] {
        &self.blocks
    }

    /// The decluttered graph at the workload.
    pub fn typed(&self) -> &TypedModel {
        &self.typed
    }

    /// The model's inputs.
    pub fn input_specs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// The loading options.
    pub fn options(&self) -> &TractOptions {
        &self.options
    }

    /// The parsed ONNX file.
    pub fn file(&self) -> &OnnxFile {
        &self.file
    }

    /// Size of the token vocabulary, when the embedding table was found.
    pub fn vocab(&self) -> Option<usize> {
        self.vocab
    }

    /// The calibration samples set with [`TractModel::set_calibration`].
    pub fn calibration_samples(&self) -> &[Vec<i64>] {
        &self.calibration
    }

    /// True when the model takes a KV cache.
    pub fn has_kv_cache(&self) -> bool {
        self.inputs
            .iter()
            .any(|s| matches!(s.role, InputRole::Past { .. }))
    }

    /// Sets the calibration samples (token id sequences; each is truncated or padded
    /// to the workload's sequence length). Fails on ids beyond the vocabulary.
    pub fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        if samples.iter().all(|s| s.is_empty()) {
            return Err(AdapterError::Calibration(
                "no calibration samples (or only empty ones)".into(),
            ));
        }
        if let Some(v) = self.vocab {
            for (i, s) in samples.iter().enumerate() {
                if let Some(&bad) = s.iter().find(|&&t| t < 0 || t as usize >= v) {
                    return Err(AdapterError::Calibration(format!(
                        "sample {i} holds token id {bad}, outside the model's vocabulary of {v}; use the model's own tokenizer"
                    )));
                }
            }
        }
        self.calibration = samples;
        Ok(())
    }

    /// The calibration samples for prefill passes sized for them (not the serving
    /// workload: decode workloads have one token): sorted by length and grouped at the
    /// smallest of a few compiled lengths that fits them, so short samples do not pay
    /// for padding. `(length, samples cut to it)`, shortest first.
    pub(crate) fn length_groups(&self) -> Vec<(usize, Vec<Vec<i64>>)> {
        let cap = match self.options.workload.phase {
            Phase::Prefill => self.options.workload.seq_len,
            Phase::Decode { .. } => usize::MAX,
        };
        let mut samples: Vec<&Vec<i64>> =
            self.calibration.iter().filter(|s| !s.is_empty()).collect();
        samples.sort_by_key(|s| s.len());
        let longest = samples.last().map(|s| s.len()).unwrap_or(1).min(cap);
        let mut lengths: Vec<usize> = [16, 32, 64, 128, 256, 512]
            .into_iter()
            .filter(|&l| l < longest)
            .collect();
        lengths.push(longest);
        let mut groups = vec![];
        let mut next = 0;
        for &len in &lengths {
            let end = next
                + samples[next..]
                    .iter()
                    .take_while(|s| s.len().min(cap) <= len)
                    .count();
            if end == next {
                continue;
            }
            let group: Vec<Vec<i64>> = samples[next..end]
                .iter()
                .map(|s| s[..s.len().min(len)].to_vec())
                .collect();
            next = end;
            groups.push((len, group));
        }
        groups
    }

    /// Runs calibration samples of at most `seq` tokens, `batch` at a time, feeding the
    /// captured activations to `sink`.
    fn calibrate_at(
        &self,
        seq: usize,
        batch: usize,
        samples: &[Vec<i64>],
        capture: &[BlockId],
        sink: &mut dyn ActivationSink,
    ) -> AdapterResult<()> {
        let cal_workload = Workload::prefill(batch, seq);
        let (typed, blocks) = if cal_workload == self.options.workload {
            (self.typed.clone(), self.blocks.clone())
        } else {
            let t = typed_at(&self.file, &self.inputs, &cal_workload)
                .map_err(|e| runtime(&format!("preparing calibration at {cal_workload}"), e))?;
            let b = recognize::recognize(&t)
                .map_err(|e| runtime("recognising the calibration graph", e))?;
            if b.len() != self.blocks.len() {
                return Err(AdapterError::runtime(
                    "recognising the calibration graph",
                    format!(
                        "{} blocks at {cal_workload}, {} at the serving workload",
                        b.len(),
                        self.blocks.len()
                    ),
                ));
            }
            (t, b)
        };
        let mut outlets = vec![];
        for id in capture {
            let b = blocks
                .get(id.index())
                .ok_or_else(|| AdapterError::InvalidRequest(format!("no {id}")))?;
            let o = b.out_proj();
            outlets.push(typed.node(o.node).inputs[o.act_slot]);
        }
        let plan = self
            .runnable_with(&typed, &outlets)
            .map_err(|e| runtime("optimising the calibration model", e))?;
        let n_outputs = typed
            .output_outlets()
            .map_err(|e| runtime("model outputs", e))?
            .len();
        for chunk in samples.chunks(batch) {
            let (ids, mask) = pad_batch(chunk, batch, seq);
            let inputs = inputs::build_inputs(&self.inputs, &cal_workload, &ids, &mask)
                .map_err(|e| runtime("building calibration inputs", e))?;
            let outs = plan
                .run(inputs)
                .map_err(|e| runtime("running calibration", e))?;
            for (k, id) in capture.iter().enumerate() {
                let o = blocks[id.index()].out_proj();
                let act = &outs[n_outputs + k];
                let rows = token_rows(act, &o.act_token_axes, &o.act_feature_axes, &mask)
                    .map_err(|e| runtime(&format!("reading activations of {id}"), e))?;
                sink.accept(*id, &rows, o.inputs())?;
            }
        }
        Ok(())
    }

    /// Builds a runnable plan of `model` with extra outputs (in order after the
    /// model's own).
    pub(crate) fn runnable_with(
        &self,
        model: &TypedModel,
        extra: &[OutletId],
    ) -> TractResult<Arc<TypedSimplePlan>> {
        let mut m = model.clone();
        let mut outs = m.output_outlets()?.to_vec();
        outs.extend_from_slice(extra);
        m.select_output_outlets(&outs)?;
        m.into_optimized()?.into_runnable()
    }

    /// Runs the dense model at the serving workload and returns every output.
    pub fn run_dense(&self, ids: &[i64], mask: &[i64]) -> AdapterResult<TVec<TValue>> {
        let plan = self
            .runnable_with(&self.typed, &[])
            .map_err(|e| runtime("optimising the model", e))?;
        let inputs = inputs::build_inputs(&self.inputs, &self.options.workload, ids, mask)
            .map_err(|e| runtime("building inputs", e))?;
        plan.run(inputs)
            .map_err(|e| runtime("running the model", e))
    }
}

/// Samples per calibration pass.
pub(crate) const CALIBRATION_BATCH: usize = 8;

/// Pads (or truncates) samples into a `batch x seq` block of ids and a mask; missing
/// rows are all padding.
pub fn pad_batch(samples: &[Vec<i64>], batch: usize, seq: usize) -> (Vec<i64>, Vec<i64>) {
    let mut ids = vec![0i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    for (i, s) in samples.iter().take(batch).enumerate() {
        for (j, &t) in s.iter().take(seq).enumerate() {
            ids[i * seq + j] = t;
            mask[i * seq + j] = 1;
        }
    }
    (ids, mask)
}

fn vocab_size(model: &TypedModel) -> Option<usize> {
    use tract_onnx::tract_core::ops::array::Gather;
    let ids = model
        .input_outlets()
        .ok()?
        .iter()
        .copied()
        .find(|o| model.node(o.node).name == "input_ids")?;
    for succ in model.outlet_successors(ids) {
        let node = model.node(succ.node);
        if node.op_is::<Gather>() && succ.slot == 1 {
            let table = model.outlet_fact(node.inputs[0]).ok()?;
            return table.shape[0].to_usize().ok();
        }
    }
    None
}

fn structure_of(
    blocks: &[RecognizedBlock],
    options: &TractOptions,
    file: &OnnxFile,
) -> AdapterResult<ModelStructure> {
    let mut out = vec![];
    for (i, b) in blocks.iter().enumerate() {
        let kind = match &b.kind {
            RecognizedKind::Attention {
                n_heads,
                n_kv_heads,
                head_dim,
                ..
            } => BlockKind::Attention(AttentionShape {
                n_heads: *n_heads,
                n_kv_heads: *n_kv_heads,
                head_dim: *head_dim,
            }),
            RecognizedKind::Ffn { ups, down } => BlockKind::Ffn(FfnShape {
                width: down.inputs(),
                gated: ups.len() == 2,
            }),
        };
        out.push(PrunableBlock {
            id: BlockId(i as u32),
            layer: LayerIndex(b.layer as u32),
            kind,
            hidden: b.out_proj().outputs,
            name: b.name.clone(),
        });
    }
    let architecture = if out
        .iter()
        .any(|b| matches!(b.kind, BlockKind::Ffn(FfnShape { gated: true, .. })))
    {
        "llama"
    } else if file.has_layer_norm_after_residual() {
        "bert"
    } else {
        "gpt2"
    };
    Ok(ModelStructure {
        architecture: architecture.into(),
        blocks: out,
        constraints: ShapeConstraints {
            gqa_policy: options.gqa_policy,
            uniform_heads: false,
            uniform_ffn_width: false,
            ffn_width_multiple: 1,
            module_removal: ModuleRemoval::Independent,
            fixed_heads: false,
        },
    })
}

impl onnx::OnnxSource for TractModel {
    fn source_path(&self) -> &Path {
        &self.path
    }
    fn source_file(&self) -> &OnnxFile {
        &self.file
    }
    fn source_inputs(&self) -> &[InputSpec] {
        &self.inputs
    }
    fn source_workload(&self) -> Workload {
        self.options.workload
    }
    fn source_structure(&self) -> &ModelStructure {
        &self.structure
    }
    fn source_blocks(&self) -> &[RecognizedBlock] {
        &self.blocks
    }
}

impl ModelAdapter for TractModel {
    fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        TractModel::set_calibration(self, samples)
    }

    fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }

    fn structure(&self) -> &ModelStructure {
        &self.structure
    }

    fn calibrate(
        &mut self,
        capture: &[BlockId],
        sink: &mut dyn ActivationSink,
    ) -> AdapterResult<()> {
        if self.calibration.is_empty() {
            return Err(AdapterError::Calibration(
                "no calibration samples set".into(),
            ));
        }
        let batch = CALIBRATION_BATCH.min(self.calibration.len()).max(1);
        for (len, group) in self.length_groups() {
            self.calibrate_at(len, batch, &group, capture, sink)?;
        }
        Ok(())
    }

    fn paired_streams(&self) -> AdapterResult<Box<dyn ziplm_plugin_api::PairedStreams + '_>> {
        Ok(Box::new(super::streams::TractStreams::new(self)?))
    }

    fn out_projection(&self, block: BlockId) -> AdapterResult<WeightMatrix> {
        let b = self
            .blocks
            .get(block.index())
            .ok_or_else(|| AdapterError::InvalidRequest(format!("no {block}")))?;
        let o = b.out_proj();
        let (n_in, n_out) = (o.inputs(), o.outputs);
        // canonical is [in, out]; the engine wants [out, in].
        let mut data = vec![0f32; n_in * n_out];
        for i in 0..n_in {
            for j in 0..n_out {
                data[j * n_in + i] = o.canonical[i * n_out + j];
            }
        }
        Ok(WeightMatrix {
            rows: n_out,
            cols: n_in,
            data,
        })
    }

    fn emit(
        &self,
        plan: &Plan,
        weights: &PrunedWeights,
        dest: &Path,
    ) -> AdapterResult<EmitSummary> {
        plan.validate_for(&self.structure)
            .map_err(AdapterError::InvalidRequest)?;
        let bytes = onnx::emit(self, plan, weights)?;
        crate::fsutil::write_atomic(dest, &bytes).map_err(|e| match e {
            crate::Error::Io { path, source } => AdapterError::Io { path, source },
            other => AdapterError::runtime("writing the model", other),
        })?;
        let params = |p: &Plan| -> u64 {
            p.blocks
                .iter()
                .zip(&self.structure.blocks)
                .map(|(bp, b)| match b.kind {
                    BlockKind::Attention(a) => {
                        (b.hidden * a.head_dim * (2 * bp.kept.len() + 2 * bp.kept_kv_heads.len()))
                            as u64
                    }
                    BlockKind::Ffn(f) => {
                        (b.hidden * bp.kept.len() * if f.gated { 3 } else { 2 }) as u64
                    }
                })
                .sum()
        };
        Ok(EmitSummary {
            path: dest.into(),
            bytes: bytes.len() as u64,
            params_before: params(&Plan::dense(&self.structure)),
            params_after: params(plan),
        })
    }
}

/// Rearranges an activation tensor to token-major rows of features (in weight order),
/// keeping the tokens whose mask is 1.
pub(crate) fn token_rows(
    act: &TValue,
    token_axes: &[usize],
    feature_axes: &[usize],
    mask: &[i64],
) -> TractResult<Vec<f32>> {
    let t = act.cast_to::<f32>()?;
    let view = t.to_plain_array_view::<f32>()?;
    let perm: Vec<usize> = token_axes.iter().chain(feature_axes).copied().collect();
    if perm.len() != view.ndim() {
        bail!("activation of rank {} does not split into tokens {token_axes:?} and features {feature_axes:?}", view.ndim());
    }
    let shape = view.shape().to_vec();
    let n_tokens: usize = token_axes.iter().map(|&a| shape[a]).product();
    let width: usize = feature_axes.iter().map(|&a| shape[a]).product();
    let permuted = view.permuted_axes(perm);
    let flat: Vec<f32> = permuted.iter().copied().collect();
    if n_tokens != mask.len() {
        bail!("{n_tokens} token rows for a mask of {} tokens", mask.len());
    }
    let mut rows = Vec::with_capacity(flat.len());
    for (t, &m) in mask.iter().enumerate() {
        if m != 0 {
            rows.extend_from_slice(&flat[t * width..(t + 1) * width]);
        }
    }
    Ok(rows)
}

/// Loads ONNX bytes (an emitted model) at a workload and returns its runnable plan and
/// input specs.
pub fn runnable_from_bytes(
    bytes: &[u8],
    workload: &Workload,
) -> TractResult<(Arc<TypedSimplePlan>, Vec<InputSpec>)> {
    let (typed, specs) = typed_from_bytes(bytes, workload)?;
    Ok((typed.into_optimized()?.into_runnable()?, specs))
}

/// Loads ONNX bytes at a workload as a decluttered typed model (what a tract runtime
/// prepares) and returns it with the input specs.
pub fn typed_from_bytes(
    bytes: &[u8],
    workload: &Workload,
) -> TractResult<(TypedModel, Vec<InputSpec>)> {
    let file = OnnxFile::from_bytes(bytes, Path::new("<memory>"))
        .map_err(|e| tract_onnx::tract_core::internal::anyhow!("{e}"))?;
    let inference = file.inference_model()?;
    let specs = inputs::input_specs(&inference)?;
    let typed = typed_at(&file, &specs, workload)?;
    Ok((typed, specs))
}
