//! Sequential correction's statistics (ZIPLM.md section 8): the Gram matrix of the
//! pruned model's inputs `H~ = 2 X~ X~^T / N`, the cross product `C = 2 X X~^T / N`
//! with the dense inputs, and the re-targeted weights `W* = W C H~^-1`.
//!
//! For any `W'`, `||W' X~ - W X||^2 = ||(W' - W*) X~||^2 + ||W* X~ - W X||^2` (exact
//! without dampening), so structured OBS run on `(W*, H~)` minimises the sequential
//! error itself: it re-chooses which groups to keep and fits their weights.
//!
//! With the residual streams given ([`PairedGram::add_residual`]), the target is the
//! section's variant `W X + (h - h~)`: the block also cancels the drift its residual
//! input carries, so the sums `h~ + W' X~` and `h + W X` agree as well as they can;
//! `W* = (W C + D) H~^-1` with `D = 2 (h - h~) X~^T / N`.

use super::gram::GramAccumulator;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};

/// Tokens per f32 cross product (bounds the scratch memory).
const CHUNK_TOKENS: usize = 512;

/// Accumulates `H~` and `C` of one block over paired token batches. Memory:
/// `2 * width^2 * 8` bytes.
#[derive(Clone, Debug)]
pub struct PairedGram {
    pruned: GramAccumulator,
    cross: Mat<f64>,
    /// `sum (h - h~) x~^T` (hidden x width), once residuals are given.
    drift: Option<Mat<f64>>,
    /// `h - h~` of the tokens of the next [`PairedGram::add`] (token-major), and the
    /// hidden width.
    pending: Option<(Vec<f32>, usize)>,
}

impl PairedGram {
    /// An empty accumulator for inputs of `width` features.
    pub fn new(width: usize) -> Self {
        PairedGram {
            pruned: GramAccumulator::new(width),
            cross: Mat::zeros(width, width),
            drift: None,
            pending: None,
        }
    }

    /// Gives the residual streams (dense `h`, pruned `h~`, `hidden` values per token)
    /// of the tokens the next [`PairedGram::add`] brings: the fit then also cancels
    /// their drift. Every batch must then come with its residuals.
    pub fn add_residual(&mut self, dense: &[f32], pruned: &[f32], hidden: usize) -> Result<()> {
        if dense.len() != pruned.len() || hidden == 0 || !dense.len().is_multiple_of(hidden) {
            return Err(Error::Invalid(format!(
                "residual streams of {} dense and {} pruned values do not pair up in rows of {hidden}",
                dense.len(),
                pruned.len()
            )));
        }
        if let Some(m) = &self.drift {
            if m.nrows() != hidden {
                return Err(Error::Invalid(format!(
                    "residual width {hidden} after {}",
                    m.nrows()
                )));
            }
        }
        let diff: Vec<f32> = dense.iter().zip(pruned).map(|(a, b)| a - b).collect();
        check_finite(&diff, hidden, "a residual stream")?;
        self.pending = Some((diff, hidden));
        Ok(())
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.pruned.tokens()
    }

    /// Whether residual streams came with the batches (the drift variant's target).
    pub fn has_residuals(&self) -> bool {
        self.drift.is_some()
    }

    /// Adds paired tokens: `dense` and `pruned` are token-major rows of the width,
    /// the same tokens in the same order. Fails (and adds nothing) on a length
    /// mismatch or a NaN / infinite value.
    pub fn add(&mut self, dense: &[f32], pruned: &[f32]) -> Result<()> {
        let d = self.pruned.width();
        if dense.len() != pruned.len() {
            return Err(Error::Invalid(format!(
                "paired activations of {} dense and {} pruned values: the two streams must hold the same tokens",
                dense.len(),
                pruned.len()
            )));
        }
        check_finite(dense, d, "a dense input")?;
        let n_tokens = dense.len() / d.max(1);
        // Residuals come with every batch or with none.
        let with_residuals = self.pending.is_some();
        if self.tokens() > 0 && with_residuals != self.drift.is_some() {
            return Err(Error::Invalid(
                "paired batches with and without residuals: give them with every batch or with none".into(),
            ));
        }
        if let Some((diff, hidden)) = &self.pending {
            if diff.len() / hidden != n_tokens {
                return Err(Error::Invalid(format!(
                    "residuals of {} tokens for {n_tokens} paired inputs",
                    diff.len() / hidden
                )));
            }
        }
        // Checks the width and the pruned values, and adds H~.
        self.pruned.add(pruned)?;
        let pending = self.pending.take();
        let n = dense.len() / d;
        if let Some((diff, hidden)) = &pending {
            let hidden = *hidden;
            let drift = self.drift.get_or_insert_with(|| Mat::zeros(hidden, d));
            for start in (0..n).step_by(CHUNK_TOKENS) {
                let len = CHUNK_TOKENS.min(n - start);
                let dm = Mat::<f32>::from_fn(hidden, len, |i, t| diff[(start + t) * hidden + i]);
                let xm = Mat::<f32>::from_fn(d, len, |i, t| pruned[(start + t) * d + i]);
                let mut p = Mat::<f32>::zeros(hidden, d);
                matmul(
                    p.as_mut(),
                    Accum::Replace,
                    dm.as_ref(),
                    xm.transpose(),
                    1.0f32,
                    Par::Seq,
                );
                for j in 0..d {
                    for (o, &v) in drift.col_as_slice_mut(j).iter_mut().zip(p.col_as_slice(j)) {
                        *o += v as f64;
                    }
                }
            }
        }
        let chunk = CHUNK_TOKENS.min(n.max(1));
        let mut xd = Mat::<f32>::zeros(d, chunk);
        let mut xp = Mat::<f32>::zeros(d, chunk);
        let mut product = Mat::<f32>::zeros(d, d);
        for start in (0..n).step_by(CHUNK_TOKENS) {
            let len = CHUNK_TOKENS.min(n - start);
            for t in 0..len {
                let at = (start + t) * d..(start + t + 1) * d;
                xd.col_as_slice_mut(t).copy_from_slice(&dense[at.clone()]);
                xp.col_as_slice_mut(t).copy_from_slice(&pruned[at]);
            }
            let par = if d * d * len >= 1 << 22 {
                Par::rayon(0)
            } else {
                Par::Seq
            };
            matmul(
                product.as_mut(),
                Accum::Replace,
                xd.as_ref().subcols(0, len),
                xp.as_ref().subcols(0, len).transpose(),
                1.0f32,
                par,
            );
            for j in 0..d {
                let src = product.col_as_slice(j);
                let dst = self.cross.col_as_slice_mut(j);
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o += v as f64;
                }
            }
        }
        Ok(())
    }

    /// `H~`, the pruned inputs' Gram matrix (`2 X~ X~^T / N`), undampened: with the
    /// dense weights, what OBS runs on for the `W X~` target.
    pub fn pruned_gram(&self) -> Result<Mat<f64>> {
        self.pruned.finish()
    }

    /// `(W*, H~)` for the dense out-projection `w` (outputs x width), `H~` undampened.
    ///
    /// `W* = (W C + lambda W) (H~ + lambda I)^-1`, `lambda = dampening * mean(diag H~)`:
    /// the dampening pulls the fit towards the block's own weights, and `W* = W`
    /// exactly when the pruned inputs are the dense ones. Inputs the pruned stream
    /// never activates (`H~_jj = 0`) get a unit diagonal here; [`super::PreparedLayer`]
    /// zeroes them.
    pub fn retarget(&self, w: MatRef<'_, f64>, dampening: f64) -> Result<(Mat<f64>, Mat<f64>)> {
        let d = self.pruned.width();
        if w.ncols() != d {
            return Err(Error::Invalid(format!(
                "the out-projection has {} inputs, the paired activations {d}",
                w.ncols()
            )));
        }
        let h = self.pruned.finish()?;
        let scale = 2.0 / self.tokens() as f64;
        let c = Mat::from_fn(d, d, |i, j| self.cross[(i, j)] * scale);
        let mut damped = h.clone();
        let mean_diag = (0..d).map(|j| h[(j, j)]).sum::<f64>() / d.max(1) as f64;
        let lambda = dampening * mean_diag;
        for j in 0..d {
            if damped[(j, j)] <= 0.0 {
                damped[(j, j)] = 1.0;
            }
            damped[(j, j)] += lambda;
        }
        // (H~ + lambda I) W*^T = (W C + lambda W)^T
        let mut rhs = Mat::<f64>::zeros(w.nrows(), d);
        matmul(rhs.as_mut(), Accum::Replace, w, c.as_ref(), 1.0, Par::Seq);
        rhs += &Mat::from_fn(w.nrows(), d, |i, j| lambda * w[(i, j)]);
        if let Some(drift) = &self.drift {
            if drift.nrows() != w.nrows() {
                return Err(Error::Invalid(format!(
                    "residuals of width {} for an out-projection of {} outputs",
                    drift.nrows(),
                    w.nrows()
                )));
            }
            rhs += &Mat::from_fn(w.nrows(), d, |i, j| drift[(i, j)] * scale);
        }
        let llt = damped.as_ref().llt(Side::Lower).map_err(|e| {
            Error::numerical(
                "sequential correction",
                format!(
                    "the pruned model's input Gram matrix is not positive definite ({e:?}): calibrate on more tokens than the block has inputs"
                ),
            )
        })?;
        let mut wt = rhs.transpose().to_owned();
        llt.solve_in_place(wt.as_mut());
        Ok((wt.transpose().to_owned(), h))
    }
}

/// Fails naming the first NaN or infinite value of token-major `rows` of `width`.
fn check_finite(rows: &[f32], width: usize, what: &str) -> Result<()> {
    match rows.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(pos) => Err(Error::Calibration {
            context: format!("{what} of width {width}"),
            detail: format!(
                "value {} of token {} is {}",
                pos % width,
                pos / width,
                rows[pos]
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n * d)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn as_cols(r: &[f32], d: usize) -> Mat<f64> {
        let n = r.len() / d;
        Mat::from_fn(d, n, |i, t| r[t * d + i] as f64)
    }

    fn sq(m: &Mat<f64>) -> f64 {
        let mut s = 0.0;
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                s += m[(i, j)] * m[(i, j)];
            }
        }
        s
    }

    /// ZIPLM.md section 8's identity, undampened:
    /// `||W' X~ - W X||^2 = ||(W' - W*) X~||^2 + ||W* X~ - W X||^2` for any `W'`.
    #[test]
    fn the_sequential_error_splits_around_the_retargeted_weights() {
        let (d, n, d_out) = (6, 700, 4); // 700 tokens cross the chunk boundary
        let dense = rows(n, d, 1);
        // The pruned stream: the dense inputs drifted, mixed and noisy.
        let noise = rows(n, d, 2);
        let pruned: Vec<f32> = (0..n * d)
            .map(|k| 0.8 * dense[k] + 0.3 * dense[(k / d) * d + (k + 1) % d] + 0.2 * noise[k])
            .collect();
        let mut acc = PairedGram::new(d);
        acc.add(&dense[..300 * d], &pruned[..300 * d]).unwrap();
        acc.add(&dense[300 * d..], &pruned[300 * d..]).unwrap();
        let w = Mat::from_fn(d_out, d, |i, j| ((i * 7 + j * 3) % 5) as f64 - 2.0);
        let (w_star, _) = acc.retarget(w.as_ref(), 0.0).unwrap();
        let (x, xt) = (as_cols(&dense, d), as_cols(&pruned, d));
        let target = &w * &x;
        for trial in 0..3 {
            let w1 = Mat::from_fn(d_out, d, |i, j| {
                ((i + j * 5 + trial) % 7) as f64 * 0.3 - 1.0
            });
            let lhs = sq(&(&(&w1 * &xt) - &target));
            let rhs = sq(&(&(&w1 - &w_star) * &xt)) + sq(&(&(&w_star * &xt) - &target));
            assert!((lhs - rhs).abs() <= 1e-6 * lhs, "{lhs} vs {rhs}");
        }
    }

    /// `W* = W` when the pruned inputs are the dense ones, with or without dampening.
    #[test]
    fn equal_streams_keep_the_weights() {
        let (d, n) = (5, 64);
        let x = rows(n, d, 3);
        let w = Mat::from_fn(3, d, |i, j| (i as f64 - j as f64) * 0.5);
        let mut acc = PairedGram::new(d);
        acc.add(&x, &x).unwrap();
        for damp in [0.0, 0.01, 1.0] {
            let (w_star, _) = acc.retarget(w.as_ref(), damp).unwrap();
            let diff = sq(&(&w_star - &w));
            assert!(diff < 1e-16 * sq(&w).max(1.0), "dampening {damp}: {diff}");
        }
    }

    /// The drift variant: `W*` is the least-squares fit of `W X + (h - h~)` on `X~`
    /// (undampened), checked against the normal equations computed directly.
    #[test]
    fn the_residual_target_fits_the_output_plus_the_drift() {
        let (d, n, hidden) = (4, 600, 3);
        let x = rows(n, d, 5);
        let noise = rows(n, d, 6);
        let xt: Vec<f32> = x
            .iter()
            .zip(&noise)
            .map(|(a, b)| 0.9 * a + 0.3 * b)
            .collect();
        let h = rows(n, hidden, 7);
        let ht: Vec<f32> = h
            .iter()
            .zip(rows(n, hidden, 8))
            .map(|(a, b)| a + 0.2 * b)
            .collect();
        let mut acc = PairedGram::new(d);
        for (a, b) in [(0, 250), (250, n)] {
            acc.add_residual(
                &h[a * hidden..b * hidden],
                &ht[a * hidden..b * hidden],
                hidden,
            )
            .unwrap();
            acc.add(&x[a * d..b * d], &xt[a * d..b * d]).unwrap();
        }
        let w = Mat::from_fn(hidden, d, |i, j| (i as f64 + 1.0) * 0.4 - j as f64 * 0.3);
        let (w_star, _) = acc.retarget(w.as_ref(), 0.0).unwrap();
        // Residual of the fit is orthogonal to X~: (W* X~ - T) X~^T = 0.
        let (xm, xtm) = (as_cols(&x, d), as_cols(&xt, d));
        let drift = Mat::from_fn(hidden, n, |i, t| {
            (h[t * hidden + i] - ht[t * hidden + i]) as f64
        });
        let target = &(&w * &xm) + &drift;
        let r = &(&(&w_star * &xtm) - &target) * xtm.transpose();
        assert!(
            sq(&r).sqrt() < 1e-6 * sq(&target).sqrt() * (n as f64).sqrt(),
            "{}",
            sq(&r)
        );
        // Residuals must come with every batch once they came with one.
        assert!(acc.add(&x[..d], &xt[..d]).is_err());
    }

    #[test]
    fn mismatched_or_non_finite_pairs_are_refused() {
        let mut acc = PairedGram::new(2);
        assert!(acc.add(&[1.0, 2.0], &[1.0]).is_err());
        assert!(acc.add(&[f32::NAN, 2.0], &[1.0, 2.0]).is_err());
        assert!(acc.add(&[1.0, 2.0], &[f32::INFINITY, 2.0]).is_err());
        assert_eq!(acc.tokens(), 0);
        assert!(acc.retarget(Mat::<f64>::zeros(1, 2).as_ref(), 0.0).is_err());
    }
}
