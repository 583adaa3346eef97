//! Greedy structured OBS with explicit updates, for groups of any size.
//!
//! Used for attention heads (a handful of groups of `head_dim` columns) and as the
//! reference the faster column path ([`super::lazy`]) is tested against.

use super::prepare::PreparedLayer;
use super::Removal;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};
use ziplm_plugin_api::{GroupLayout, GroupSchedule};

/// The state of a greedy removal: current weights and inverse Hessian.
///
/// Removed columns hold exact zeros in `weights()`, and the rows and columns of
/// removed inputs are exact zeros in `hinv()` (ZIPLM.md identity 3).
pub struct GroupGreedy<'a> {
    layer: &'a PreparedLayer,
    layout: &'a GroupLayout,
    w: Mat<f64>,
    hinv: Mat<f64>,
    removed: Vec<bool>,
    class_hit: Vec<bool>,
    n_removed: usize,
}

impl<'a> GroupGreedy<'a> {
    /// Starts from the dense layer (inverts `H` once).
    pub fn new(layer: &'a PreparedLayer, layout: &'a GroupLayout) -> Result<Self> {
        layout
            .validate(layer.n_inputs())
            .map_err(|e| Error::Invalid(format!("group layout: {e}")))?;
        let n_classes = match &layout.schedule {
            GroupSchedule::Free => 0,
            GroupSchedule::Balanced { class_of } => {
                class_of.iter().map(|&c| c as usize + 1).max().unwrap_or(0)
            }
        };
        Ok(GroupGreedy {
            layer,
            layout,
            w: layer.w.clone(),
            hinv: layer.h_inverse()?,
            removed: vec![false; layout.groups.len()],
            class_hit: vec![false; n_classes],
            n_removed: 0,
        })
    }

    /// Current weights (`d_out x n`).
    pub fn weights(&self) -> &Mat<f64> {
        &self.w
    }

    /// Current inverse Hessian (`n x n`, zero on removed inputs).
    pub fn hinv(&self) -> &Mat<f64> {
        &self.hinv
    }

    /// Groups removed so far.
    pub fn n_removed(&self) -> usize {
        self.n_removed
    }

    /// `||W_now - W_dense||_F^2`.
    pub fn delta_sq(&self) -> f64 {
        let mut s = 0.0;
        for j in 0..self.w.ncols() {
            for (a, b) in self
                .w
                .col_as_slice(j)
                .iter()
                .zip(self.layer.w.col_as_slice(j))
            {
                s += (a - b) * (a - b);
            }
        }
        s
    }

    fn eligible(&self, g: usize) -> bool {
        if self.removed[g] {
            return false;
        }
        match &self.layout.schedule {
            GroupSchedule::Free => true,
            GroupSchedule::Balanced { class_of } => !self.class_hit[class_of[g] as usize],
        }
    }

    /// OBS score of removing group `g` now: `sum_i w_iM (Hinv_MM)^-1 w_iM^T`.
    pub fn score(&self, g: usize) -> Result<f64> {
        let cols = &self.layout.groups[g];
        if cols.len() == 1 {
            let j = cols[0];
            let norm: f64 = self.w.col_as_slice(j).iter().map(|v| v * v).sum();
            return Ok(norm / self.hinv[(j, j)]);
        }
        let (llt, _) = self.block_llt(g)?;
        let mut y = Mat::from_fn(cols.len(), self.w.nrows(), |a, i| self.w[(i, cols[a])]);
        llt.solve_in_place(y.as_mut());
        let mut s = 0.0;
        for i in 0..self.w.nrows() {
            for (a, &c) in cols.iter().enumerate() {
                s += self.w[(i, c)] * y[(a, i)];
            }
        }
        Ok(s)
    }

    fn block_llt(&self, g: usize) -> Result<(faer::linalg::solvers::Llt<f64>, Mat<f64>)> {
        let cols = &self.layout.groups[g];
        let block = Mat::from_fn(cols.len(), cols.len(), |a, b| self.hinv[(cols[a], cols[b])]);
        let llt = block.as_ref().llt(Side::Lower).map_err(|e| {
            Error::numerical(
                format!("OBS step {}", self.n_removed),
                format!("inverse-Hessian block of group {g} is not positive definite ({e:?}); raise the dampening"),
            )
        })?;
        Ok((llt, block))
    }

    /// Removes the cheapest eligible group and compensates the remaining weights.
    /// Returns `None` when every group is removed.
    pub fn step(&mut self) -> Result<Option<Removal>> {
        let mut best: Option<(usize, f64)> = None;
        for g in 0..self.layout.groups.len() {
            if !self.eligible(g) {
                continue;
            }
            let s = self.score(g)?;
            if s.is_nan() {
                return Err(Error::numerical(
                    format!("OBS step {}", self.n_removed),
                    format!("score of group {g} is NaN"),
                ));
            }
            if best.is_none_or(|(_, b)| s < b) {
                best = Some((g, s));
            }
        }
        let Some((g, score)) = best else {
            return Ok(None);
        };
        self.remove(g)?;
        Ok(Some(Removal { group: g, score }))
    }

    /// Removes group `g` (whatever its score): `W <- W - W_M Hinv_MM^-1 Hinv_M:`,
    /// `Hinv <- Hinv - Hinv_:M Hinv_MM^-1 Hinv_M:`, then exact zeros on `M`.
    pub fn remove(&mut self, g: usize) -> Result<()> {
        let cols = self.layout.groups[g].clone();
        let n = self.w.ncols();
        let (llt, _) = self.block_llt(g)?;
        // Z = Hinv_MM^-1 Hinv[M, :]   (|M| x n)
        let mut z = Mat::from_fn(cols.len(), n, |a, j| self.hinv[(cols[a], j)]);
        llt.solve_in_place(z.as_mut());
        let wm = Mat::from_fn(self.w.nrows(), cols.len(), |i, a| self.w[(i, cols[a])]);
        let hm = Mat::from_fn(n, cols.len(), |i, a| self.hinv[(i, cols[a])]);
        matmul(
            self.w.as_mut(),
            Accum::Add,
            wm.as_ref(),
            z.as_ref(),
            -1.0,
            Par::Seq,
        );
        matmul(
            self.hinv.as_mut(),
            Accum::Add,
            hm.as_ref(),
            z.as_ref(),
            -1.0,
            Par::Seq,
        );
        for &c in &cols {
            self.w.col_mut(c).fill(0.0);
            self.hinv.col_mut(c).fill(0.0);
            self.hinv.row_mut(c).fill(0.0);
        }
        self.removed[g] = true;
        self.n_removed += 1;
        if let GroupSchedule::Balanced { class_of } = &self.layout.schedule {
            self.class_hit[class_of[g] as usize] = true;
            if self.class_hit.iter().all(|&h| h) {
                self.class_hit.fill(false);
            }
        }
        Ok(())
    }
}
