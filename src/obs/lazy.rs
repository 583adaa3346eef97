//! Greedy OBS over single columns with blocked, lazy updates.
//!
//! The explicit algorithm ([`super::greedy`]) pays a rank-1 update of the full inverse
//! Hessian (`n^2`) and of `W` (`d_out * n`) per removed column: for a 576x1536 FFN
//! taken to 90% that streams ~20 GB through memory. Here the selection only needs the
//! diagonal of `Hinv` and the column norms of `W`, which can be kept current from
//! low-rank corrections:
//!
//! ```text
//! Hinv_now = Hf - U D^-1 U^T        W_now = Wf - A D^-1 U^T
//! ```
//!
//! where `Hf`, `Wf` are the state at the last fold and the columns of `U`, `A` are the
//! removed rows of `Hinv` and columns of `W` since then. Every `block` steps (and at
//! each checkpoint) the corrections are folded in with two matrix products and the
//! removed columns are compacted away, so matrices shrink as pruning proceeds. Per
//! step the cost is one `d_out x m` matrix-vector product plus `O((n + d_out) * block)`.

use super::prepare::PreparedLayer;
use super::Removal;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

/// Steps between folds when no checkpoint comes first. Chosen by the `obs_ffn`
/// bench: smaller folds more often (matrix products get thin), larger makes the
/// per-step corrections (`O(n * block)`) dominate.
pub const DEFAULT_FOLD_EVERY: usize = 48;

/// Lazy greedy removal over single columns (every column its own group, free order).
pub struct ColumnGreedy<'a> {
    layer: &'a PreparedLayer,
    fold_every: usize,
    /// Original column index of each active (compacted) position.
    active: Vec<usize>,
    /// Weights at the last fold, `d_out x m`.
    wf: Mat<f64>,
    /// Inverse Hessian at the last fold, `m x m`.
    hf: Mat<f64>,
    /// Removed rows of Hinv since the fold (`m x fold_every`), column t = step t.
    u: Mat<f64>,
    /// Removed columns of W since the fold (`d_out x fold_every`).
    a: Mat<f64>,
    /// `1 / d_t` for each step since the fold.
    dinv: Vec<f64>,
    /// Current diagonal of Hinv and squared column norms of W (active positions).
    diag: Vec<f64>,
    norms: Vec<f64>,
    removed_local: Vec<bool>,
    /// Squared norm of the dense weights of every removed column.
    removed_dense_sq: f64,
    n_removed: usize,
    // scratch
    coef: Mat<f64>,
    g: Mat<f64>,
}

impl<'a> ColumnGreedy<'a> {
    /// Starts from the dense layer (inverts `H` once).
    pub fn new(layer: &'a PreparedLayer, fold_every: usize) -> Result<Self> {
        let n = layer.n_inputs();
        let d_out = layer.n_outputs();
        let fold_every = fold_every.max(1);
        let hf = layer.h_inverse()?;
        let wf = layer.w.clone();
        let mut s = ColumnGreedy {
            layer,
            fold_every,
            active: (0..n).collect(),
            wf,
            hf,
            u: Mat::zeros(n, fold_every),
            a: Mat::zeros(d_out, fold_every),
            dinv: Vec::with_capacity(fold_every),
            diag: Vec::new(),
            norms: Vec::new(),
            removed_local: vec![false; n],
            removed_dense_sq: 0.0,
            n_removed: 0,
            coef: Mat::zeros(fold_every, 1),
            g: Mat::zeros(n, 1),
        };
        s.refresh_exact();
        Ok(s)
    }

    /// Columns removed so far.
    pub fn n_removed(&self) -> usize {
        self.n_removed
    }

    fn refresh_exact(&mut self) {
        let m = self.active.len();
        self.diag = (0..m).map(|j| self.hf[(j, j)]).collect();
        self.norms = (0..m)
            .map(|j| self.wf.col_as_slice(j).iter().map(|v| v * v).sum())
            .collect();
        self.removed_local = vec![false; m];
    }

    /// Removes the cheapest column. `None` when none is left.
    // `!(d > 0.0)` on purpose: a NaN pivot is refused too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn step(&mut self) -> Result<Option<Removal>> {
        let m = self.active.len();
        let mut best: Option<(usize, f64)> = None;
        for j in 0..m {
            if self.removed_local[j] {
                continue;
            }
            let d = self.diag[j];
            // Negated so that a NaN pivot is refused too.
            if !(d > 0.0) {
                return Err(Error::numerical(
                    format!("OBS step {}", self.n_removed),
                    format!(
                        "inverse-Hessian diagonal of column {} is {d}; raise the dampening",
                        self.active[j]
                    ),
                ));
            }
            let s = self.norms[j].max(0.0) / d;
            if best.is_none_or(|(_, b)| s < b) {
                best = Some((j, s));
            }
        }
        let Some((p, _)) = best else { return Ok(None) };
        let t = self.dinv.len();
        let d_out = self.wf.nrows();

        // coef_s = U[p, s] / d_s for the steps already in this block.
        for s in 0..t {
            self.coef[(s, 0)] = self.u[(p, s)] * self.dinv[s];
        }
        let coef = self.coef.as_ref().subrows(0, t);
        // u = Hf[:, p] - U coef   (the current row/column p of Hinv)
        {
            let mut ucol = self.u.as_mut().subrows_mut(0, m).col_mut(t);
            ucol.copy_from(self.hf.col(p));
            let ucol_mat = self.u.as_mut().subrows_mut(0, m);
            let (left, right) = ucol_mat.split_at_col_mut(t);
            matmul(
                right.subcols_mut(0, 1),
                Accum::Add,
                left.as_ref(),
                coef,
                -1.0,
                Par::Seq,
            );
        }
        // a = Wf[:, p] - A coef   (the current column p of W)
        {
            let amat = self.a.as_mut();
            let (left, right) = amat.split_at_col_mut(t);
            let mut acol = right.subcols_mut(0, 1);
            acol.as_mut().col_mut(0).copy_from(self.wf.col(p));
            matmul(acol, Accum::Add, left.as_ref(), coef, -1.0, Par::Seq);
        }
        let d = self.u[(p, t)];
        // Negated so that a NaN pivot is refused too.
        if !(d > 0.0) {
            return Err(Error::numerical(
                format!("OBS step {}", self.n_removed),
                format!(
                    "inverse-Hessian pivot of column {} is {d}; raise the dampening",
                    self.active[p]
                ),
            ));
        }
        let acol = self.a.col(t);
        let a_sq: f64 = acol.iter().map(|v| v * v).sum();
        let score = a_sq / d;

        // g = W_now^T a = Wf^T a - U D^-1 (A^T a)   (length m)
        {
            let mut g = self.g.as_mut().subrows_mut(0, m);
            matmul(
                g.as_mut(),
                Accum::Replace,
                self.wf.transpose(),
                self.a.as_ref().subcols(t, 1),
                1.0,
                Par::Seq,
            );
            if t > 0 {
                let mut at_a = Mat::<f64>::zeros(t, 1);
                matmul(
                    at_a.as_mut(),
                    Accum::Replace,
                    self.a.as_ref().subcols(0, t).transpose(),
                    self.a.as_ref().subcols(t, 1),
                    1.0,
                    Par::Seq,
                );
                for s in 0..t {
                    at_a[(s, 0)] *= self.dinv[s];
                }
                matmul(
                    g,
                    Accum::Add,
                    self.u.as_ref().subrows(0, m).subcols(0, t),
                    at_a.as_ref(),
                    -1.0,
                    Par::Seq,
                );
            }
        }
        // Column j changes by -a * c_j with c_j = u_j / d.
        let dinv = 1.0 / d;
        for j in 0..m {
            if self.removed_local[j] {
                continue;
            }
            let c = self.u[(j, t)] * dinv;
            self.norms[j] += c * (c * a_sq - 2.0 * self.g[(j, 0)]);
            self.diag[j] -= self.u[(j, t)] * c;
        }
        let _ = d_out;
        self.removed_local[p] = true;
        self.diag[p] = 0.0;
        self.norms[p] = 0.0;
        self.dinv.push(dinv);
        let orig = self.active[p];
        self.removed_dense_sq += self
            .layer
            .w
            .col_as_slice(orig)
            .iter()
            .map(|v| v * v)
            .sum::<f64>();
        self.n_removed += 1;
        if self.dinv.len() == self.fold_every {
            self.fold();
        }
        Ok(Some(Removal { group: orig, score }))
    }

    /// Applies the pending corrections and compacts removed columns away.
    pub fn fold(&mut self) {
        let t = self.dinv.len();
        let m = self.active.len();
        let keep: Vec<usize> = (0..m).filter(|&j| !self.removed_local[j]).collect();
        let k = keep.len();
        // Us = U[keep, :t] D^-1
        let us = Mat::from_fn(k, t, |i, s| self.u[(keep[i], s)] * self.dinv[s]);
        let uk = Mat::from_fn(k, t, |i, s| self.u[(keep[i], s)]);
        let mut hf = Mat::from_fn(k, k, |i, j| self.hf[(keep[i], keep[j])]);
        let mut wf = Mat::from_fn(self.wf.nrows(), k, |i, j| self.wf[(i, keep[j])]);
        if t > 0 {
            matmul(
                hf.as_mut(),
                Accum::Add,
                uk.as_ref(),
                us.transpose(),
                -1.0,
                Par::Seq,
            );
            matmul(
                wf.as_mut(),
                Accum::Add,
                self.a.as_ref().subcols(0, t),
                us.transpose(),
                -1.0,
                Par::Seq,
            );
        }
        self.hf = hf;
        self.wf = wf;
        self.active = keep.iter().map(|&j| self.active[j]).collect();
        self.dinv.clear();
        self.refresh_exact();
    }

    /// `||W_now - W_dense||_F^2` (folds first).
    pub fn delta_sq(&mut self) -> f64 {
        self.fold();
        let mut s = self.removed_dense_sq;
        for (pos, &c) in self.active.iter().enumerate() {
            for (a, b) in self
                .wf
                .col_as_slice(pos)
                .iter()
                .zip(self.layer.w.col_as_slice(c))
            {
                s += (a - b) * (a - b);
            }
        }
        s
    }

    /// Current weights expanded to all `n` columns (removed ones zero). Folds first.
    pub fn weights(&mut self) -> Mat<f64> {
        self.fold();
        let mut w = Mat::zeros(self.layer.n_outputs(), self.layer.n_inputs());
        for (pos, &c) in self.active.iter().enumerate() {
            w.col_mut(c).copy_from(self.wf.col(pos));
        }
        w
    }

    /// Current inverse Hessian expanded to `n x n` (removed rows/columns zero). Folds
    /// first.
    pub fn hinv(&mut self) -> Mat<f64> {
        self.fold();
        let n = self.layer.n_inputs();
        let mut h = Mat::zeros(n, n);
        for (pi, &i) in self.active.iter().enumerate() {
            for (pj, &j) in self.active.iter().enumerate() {
                h[(i, j)] = self.hf[(pi, pj)];
            }
        }
        h
    }
}
