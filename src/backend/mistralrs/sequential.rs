//! Sequential correction (ZIPLM.md section 8) for a chosen plan, on the calibration
//! samples.
//!
//! The database fits each block's kept out-projection columns on the DENSE model's
//! inputs; once a plan is chosen, the pruned model feeds each block other inputs and the
//! errors add up with depth. Here the blocks are taken in model order with two streams
//! of hidden states, dense and pruned: for block `l`, `X` is its out-projection input in
//! the dense model and `X~` the same input computed from the pruned stream (blocks
//! before `l` pruned and corrected; block `l`'s kept heads or neurons are those of the
//! dense block). The kept columns `K` are re-fitted to the dense output,
//! `min ||W' X~_K - W X||^2 + lambda ||W' - W_K||^2`:
//! `W'_K = (W C_K + lambda W_K) (H~_KK + lambda I)^-1` with `H~ = X~_K X~_K^T`,
//! `C_K = X X~_K^T` and `lambda` the database's dampening (relative to the mean
//! diagonal): where the calibration data says little, the fit stays near the block's
//! own weights. The plan (and so every shape and the
//! latency) stays as it is; only the out-projections change.

use super::llama::{attention_core, ffn_core, linear, LlamaWeights};
use crate::error::{Error, Result};
use crate::progress::Progress;
use candle_core::{DType, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use ziplm_plugin_api::{BlockKind, ModelStructure, Plan, PrunedWeights, WeightMatrix};

fn candle(context: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| Error::numerical(context, e.to_string())
}

/// The out-projections of `plan` re-fitted on the pruned model's own inputs, for every
/// block that keeps something (its other blocks are left out, as the database leaves
/// them). `dampening` is relative to the mean diagonal of `H~`. One progress unit per
/// block.
pub fn correct(
    dense: &LlamaWeights,
    structure: &ModelStructure,
    plan: &Plan,
    samples: &[Vec<u32>],
    dampening: f64,
    progress: &dyn Progress,
) -> Result<PrunedWeights> {
    crate::obs::serial_solvers();
    let context = "sequential correction";
    let err = candle(context);
    if samples.is_empty() {
        return Err(Error::Invalid(
            "sequential correction needs the calibration samples".into(),
        ));
    }
    let cfg = &dense.config;
    let eps = cfg.rms_eps;
    let device = dense.embed.device();
    // The dense and the pruned hidden states of every sample, at the current block.
    let mut dense_h = vec![];
    let mut tables = vec![];
    for s in samples {
        let ids = Tensor::new(s.as_slice(), device).map_err(&err)?;
        dense_h.push(dense.embed.index_select(&ids, 0).map_err(&err)?);
        tables.push(super::llama::rope_and_mask(cfg, s.len(), device).map_err(&err)?);
    }
    let mut pruned_h = dense_h.clone();
    let mut out = PrunedWeights::default();
    progress.start(context, plan.blocks.len() as u64);
    for (bp, block) in plan.blocks.iter().zip(&structure.blocks) {
        let layer = &dense.layers[block.layer.0 as usize];
        let (norm, w) = match block.kind {
            BlockKind::Attention(_) => (&layer.attn_norm, &layer.wo),
            BlockKind::Ffn(_) => (&layer.ffn_norm, &layer.down),
        };
        let core = |h: &Tensor, (cos, sin, mask): &(Tensor, Tensor, Tensor)| {
            let n = candle_nn::ops::rms_norm(h, norm, eps)?;
            match block.kind {
                BlockKind::Attention(_) => attention_core(cfg, layer, &n, cos, sin, mask),
                BlockKind::Ffn(_) => ffn_core(layer, &n),
            }
        };
        let kept = bp.kept_columns();
        let d_in = block.kind.out_proj_inputs();
        // Inputs of the out-projection: X (dense stream), X~_K (pruned stream).
        let mut xs = vec![];
        let mut xts = vec![];
        let idx = Tensor::new(
            kept.iter()
                .map(|&c| c as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            device,
        )
        .map_err(&err)?;
        for ((hd, hp), t) in dense_h.iter().zip(&pruned_h).zip(&tables) {
            xs.push(core(hd, t).map_err(&err)?);
            if !kept.is_empty() {
                xts.push(
                    core(hp, t)
                        .map_err(&err)?
                        .index_select(&idx, 1)
                        .map_err(&err)?,
                );
            }
        }
        let mut refit = None;
        if !kept.is_empty() {
            let k = kept.len();
            let mut h = Mat::<f64>::zeros(k, k);
            let mut c = Mat::<f64>::zeros(d_in, k);
            for (x, xt) in xs.iter().zip(&xts) {
                add_product(&mut h, xt, xt).map_err(&err)?;
                add_product(&mut c, x, xt).map_err(&err)?;
            }
            let mean_diag = (0..k).map(|i| h[(i, i)]).sum::<f64>() / k as f64;
            let lambda = dampening * mean_diag.max(f64::MIN_POSITIVE);
            for i in 0..k {
                if h[(i, i)] == 0.0 {
                    h[(i, i)] = 1.0;
                }
                h[(i, i)] += lambda;
            }
            // The dampening pulls the fit towards the block's own kept weights, not
            // towards zero: W' = (W C_K + lambda W_K) (H~_KK + lambda I)^-1, i.e.
            // (H~_KK + lambda I) W'^T = (W C_K + lambda W_K)^T. W' = W when X~ = X.
            let wv = w
                .to_dtype(DType::F64)
                .map_err(&err)?
                .to_vec2::<f64>()
                .map_err(&err)?;
            let d_out = wv.len();
            let wmat = Mat::from_fn(d_out, d_in, |i, j| wv[i][j]);
            let mut wc = &wmat * &c;
            for i in 0..d_out {
                for (a, &col) in kept.iter().enumerate() {
                    wc[(i, a)] += lambda * wv[i][col];
                }
            }
            let llt = h.as_ref().llt(Side::Lower).map_err(|e| {
                Error::numerical(
                    context,
                    format!("the pruned inputs' Gram matrix of {} is not positive definite ({e:?}): calibrate on more tokens", block.name),
                )
            })?;
            let mut wt = wc.transpose().to_owned();
            llt.solve_in_place(wt.as_mut());
            let data: Vec<f32> = (0..d_out)
                .flat_map(|i| (0..k).map(move |j| (i, j)))
                .map(|(i, j)| wt[(j, i)] as f32)
                .collect();
            let m = WeightMatrix::new(d_out, k, data).expect("d_out x k values");
            let wt_tensor = Tensor::from_vec(m.data.clone(), (d_out, k), device).map_err(&err)?;
            refit = Some(wt_tensor);
            out.out_projections.insert(bp.block, m);
        }
        // Both streams through block l: dense with W, pruned with W'_K (or nothing).
        for (i, x) in xs.iter().enumerate() {
            dense_h[i] = (&dense_h[i] + linear(x, w).map_err(&err)?).map_err(&err)?;
            if let Some(wk) = &refit {
                pruned_h[i] = (&pruned_h[i] + linear(&xts[i], wk).map_err(&err)?).map_err(&err)?;
            }
        }
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
}

/// `acc += a^T b` for `a: [t, m]`, `b: [t, n]` (f32 product, f64 sum).
fn add_product(acc: &mut Mat<f64>, a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
    let p = a.t()?.matmul(b)?.to_vec2::<f32>()?;
    for (i, row) in p.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            acc[(i, j)] += *v as f64;
        }
    }
    Ok(())
}
