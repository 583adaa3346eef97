//! Random problems for the numerical tests.

use faer::{Accum, Mat, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded RNG.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Standard normal sample (Box-Muller).
pub fn normal(r: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = r.random::<f64>().max(1e-300);
    let u2: f64 = r.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A `rows x cols` matrix of standard normals.
pub fn randn(r: &mut ChaCha8Rng, rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |_, _| normal(r))
}

/// Inputs `X` (`n x tokens`) with correlated features: `X = M Z` for a random
/// mixing matrix with a decaying spectrum, plus a little independent noise.
pub fn correlated_inputs(r: &mut ChaCha8Rng, n: usize, tokens: usize) -> Mat<f64> {
    let k = (n / 2).max(1);
    let mix = Mat::from_fn(n, k, |_, j| normal(r) / (1.0 + j as f64).sqrt());
    let z = randn(r, k, tokens);
    let mut x = Mat::<f64>::zeros(n, tokens);
    faer::linalg::matmul::matmul(
        x.as_mut(),
        Accum::Replace,
        mix.as_ref(),
        z.as_ref(),
        1.0,
        Par::Seq,
    );
    for j in 0..tokens {
        for i in 0..n {
            x[(i, j)] += 0.05 * normal(r);
        }
    }
    x
}

/// `a * b`.
pub fn mul(a: &Mat<f64>, b: faer::MatRef<'_, f64>) -> Mat<f64> {
    let mut c = Mat::<f64>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a.as_ref(), b, 1.0, Par::Seq);
    c
}

/// `2 X X^T` (the identities of ZIPLM.md hold for this scaling).
pub fn gram2(x: &Mat<f64>) -> Mat<f64> {
    let mut h = mul(x, x.transpose());
    for j in 0..h.ncols() {
        for i in 0..h.nrows() {
            h[(i, j)] *= 2.0;
        }
    }
    h
}

/// Squared Frobenius norm.
pub fn fro2(m: &Mat<f64>) -> f64 {
    let mut s = 0.0;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            s += m[(i, j)] * m[(i, j)];
        }
    }
    s
}

/// `||(A - B) X||_F^2`.
pub fn output_error(a: &Mat<f64>, b: &Mat<f64>, x: &Mat<f64>) -> f64 {
    let d = Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] - b[(i, j)]);
    fro2(&mul(&d, x.as_ref()))
}

/// Relative difference of two matrices: `||a - b|| / max(||b||, tiny)`.
pub fn rel_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    assert_eq!((a.nrows(), a.ncols()), (b.nrows(), b.ncols()));
    let d = Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] - b[(i, j)]);
    (fro2(&d) / fro2(b).max(1e-300)).sqrt()
}

/// Relative difference of two scalars.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}
