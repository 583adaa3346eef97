//! Turning `(W, H)` into a well-posed OBS problem: dead inputs and dampening.

use crate::error::{Error, Result};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatRef, Par, Side};

/// Fraction of the mean diagonal of `H` added to its diagonal (ZIPLM.md: 1%).
pub const DEFAULT_DAMPENING: f64 = 0.01;

/// One linear layer ready for structured OBS.
///
/// `w` is the out-projection (outputs x inputs) with dead inputs zeroed; `h` is the
/// Gram matrix with dead diagonals set to 1 and `lambda` added to the diagonal.
#[derive(Clone, Debug)]
pub struct PreparedLayer {
    /// Weights, `d_out x n`, dead columns set to zero.
    pub w: Mat<f64>,
    /// Dampened Gram matrix, `n x n`.
    pub h: Mat<f64>,
    /// The dampening added to the diagonal.
    pub lambda: f64,
    /// Inputs that were never active (`H_jj = 0`).
    pub dead: Vec<bool>,
    /// `tr(W H W^T)` with the undampened `H`: the layer's output energy, the
    /// denominator of the normalised error.
    pub energy: f64,
}

impl PreparedLayer {
    /// Prepares `w` (`d_out x n`) and the undampened Gram matrix `h` (`n x n`).
    ///
    /// `dampening` is relative to the mean diagonal (0 disables it, for exact
    /// identities in tests).
    pub fn new(w: MatRef<'_, f64>, h: MatRef<'_, f64>, dampening: f64) -> Result<Self> {
        let n = w.ncols();
        if h.nrows() != n || h.ncols() != n {
            return Err(Error::Invalid(format!(
                "Gram matrix is {}x{} but the weight matrix has {n} inputs",
                h.nrows(),
                h.ncols()
            )));
        }
        if !(dampening >= 0.0 && dampening.is_finite()) {
            return Err(Error::Invalid(format!(
                "dampening must be a finite number >= 0, got {dampening}"
            )));
        }
        if let Some((i, j)) = find_non_finite(w) {
            return Err(Error::numerical(
                "weights",
                format!(
                    "weight ({i}, {j}) is {}: the model file holds NaN/Inf weights",
                    w[(i, j)]
                ),
            ));
        }
        let mut w = w.to_owned();
        let mut h = h.to_owned();
        let mut dead = vec![false; n];
        for j in 0..n {
            if h[(j, j)] <= 0.0 {
                dead[j] = true;
                h[(j, j)] = 1.0;
                w.col_mut(j).fill(0.0);
            }
        }
        // Energy with the undampened H (dead columns hold zero weights, so their
        // placeholder diagonal does not count).
        let mut wh = Mat::<f64>::zeros(w.nrows(), n);
        faer::linalg::matmul::matmul(
            wh.as_mut(),
            Accum::Replace,
            w.as_ref(),
            h.as_ref(),
            1.0,
            Par::Seq,
        );
        let energy: f64 = (0..n)
            .map(|j| {
                let a = wh.col_as_slice(j);
                let b = w.col_as_slice(j);
                a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()
            })
            .sum();
        let mean_diag = (0..n).map(|j| h[(j, j)]).sum::<f64>() / n.max(1) as f64;
        let lambda = dampening * mean_diag;
        for j in 0..n {
            h[(j, j)] += lambda;
        }
        Ok(PreparedLayer {
            w,
            h,
            lambda,
            dead,
            energy: energy.max(0.0),
        })
    }

    /// Number of inputs (columns).
    pub fn n_inputs(&self) -> usize {
        self.w.ncols()
    }

    /// Number of outputs (rows).
    pub fn n_outputs(&self) -> usize {
        self.w.nrows()
    }

    /// `H^-1` by Cholesky; fails when `H` is not positive definite.
    pub fn h_inverse(&self) -> Result<Mat<f64>> {
        let llt = self.h.as_ref().llt(Side::Lower).map_err(|e| {
            Error::numerical(
                "Gram matrix",
                format!(
                    "not positive definite ({e:?}); calibrate on more tokens than the layer has inputs, \
                     or raise the dampening"
                ),
            )
        })?;
        Ok(llt.inverse())
    }

    /// Normalised output error from the dampened quadratic increase `e_damped`
    /// (the sum of OBS scores) and `||W_pruned - W||_F^2`:
    /// `(e_damped - lambda * ||dW||^2) / energy`.
    pub fn normalised_error(&self, e_damped: f64, delta_sq: f64) -> f64 {
        if self.energy <= 0.0 {
            return 0.0;
        }
        ((e_damped - self.lambda * delta_sq) / self.energy).max(0.0)
    }
}

fn find_non_finite(m: MatRef<'_, f64>) -> Option<(usize, usize)> {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            if !m[(i, j)].is_finite() {
                return Some((i, j));
            }
        }
    }
    None
}
