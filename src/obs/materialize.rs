//! Weights of any pruning level, recomputed on demand.
//!
//! Sequential OBS updates with a fixed `H` end at the minimiser of
//! `tr((W' - W) H (W' - W)^T)` over `W'` that are zero on the removed columns
//! (ZIPLM.md identity 2), so the weights of a level follow from the kept set alone:
//! `W'_K = W_K + W_S H_SK H_KK^-1`. Storing the removal order is therefore enough;
//! no per-level weight copy is ever kept.

use super::prepare::PreparedLayer;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};

/// The compensated weights restricted to `kept` columns (ascending or not; the
/// result's columns follow `kept`'s order): a `d_out x kept.len()` matrix.
pub fn materialize(layer: &PreparedLayer, kept: &[usize]) -> Result<Mat<f64>> {
    let n = layer.n_inputs();
    let mut is_kept = vec![false; n];
    for &c in kept {
        if c >= n || std::mem::replace(&mut is_kept[c], true) {
            return Err(Error::Invalid(format!(
                "kept column {c} is out of range or repeated (n = {n})"
            )));
        }
    }
    let removed: Vec<usize> = (0..n).filter(|&c| !is_kept[c]).collect();
    let d_out = layer.n_outputs();
    let mut out = Mat::from_fn(d_out, kept.len(), |i, a| layer.w[(i, kept[a])]);
    if removed.is_empty() || kept.is_empty() {
        return Ok(out);
    }
    let hkk = Mat::from_fn(kept.len(), kept.len(), |a, b| layer.h[(kept[a], kept[b])]);
    let llt = hkk.as_ref().llt(Side::Lower).map_err(|e| {
        Error::numerical(
            "materialising pruned weights",
            format!("kept Gram block is not positive definite ({e:?})"),
        )
    })?;
    // Z = H_KK^-1 H_KS   (|K| x |S|)
    let mut z = Mat::from_fn(kept.len(), removed.len(), |a, s| {
        layer.h[(kept[a], removed[s])]
    });
    llt.solve_in_place(z.as_mut());
    let ws = Mat::from_fn(d_out, removed.len(), |i, s| layer.w[(i, removed[s])]);
    matmul(
        out.as_mut(),
        Accum::Add,
        ws.as_ref(),
        z.transpose(),
        1.0,
        Par::Seq,
    );
    Ok(out)
}
