//! Streaming accumulation of `H = 2 X X^T / N` in f64 (ZIPLM.md section 2).
//!
//! Each chunk of at most [`CHUNK_TOKENS`] tokens is multiplied in f32, the activations'
//! own precision (twice the SIMD lanes of f64, on every core through faer's rayon
//! pool), and its lower triangle is added into an f64 sum, so rounding does not grow
//! with the number of tokens: a chunk's relative error is about `sqrt(512) * 2^-24`.

use crate::error::{Error, Result};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, Par};

/// Tokens per f32 matrix product; bounds the scratch memory whatever batch the adapter
/// hands over.
const CHUNK_TOKENS: usize = 512;

/// Below this many multiply-adds a chunk's product runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 22;

/// The parallelism of one chunk's product: every thread of the global rayon pool for
/// big chunks. The result does not depend on it (faer splits the output, never the
/// sum over tokens): `parallel_and_serial_products_are_bitwise_equal`.
fn gram_parallelism(width: usize, tokens: usize) -> Par {
    if width * width * tokens / 2 >= PARALLEL_WORK {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Accumulates the Gram matrix of one layer's inputs over any number of token batches.
///
/// Only the lower triangle is accumulated (half the work); [`GramAccumulator::finish`]
/// mirrors it. Memory: `width^2 * 8` bytes.
#[derive(Clone, Debug)]
pub struct GramAccumulator {
    width: usize,
    sum: Mat<f64>,
    tokens: u64,
}

impl GramAccumulator {
    /// An empty accumulator for inputs of `width` features.
    pub fn new(width: usize) -> Self {
        GramAccumulator {
            width,
            sum: Mat::zeros(width, width),
            tokens: 0,
        }
    }

    /// Input width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Adds a batch of tokens: `rows` is token-major, `width` values per token.
    /// Scratch memory: `width * (width + 512) * 4` bytes.
    ///
    /// Fails (and adds nothing) when the length is not a multiple of the width or a
    /// value is NaN or infinite.
    pub fn add(&mut self, rows: &[f32]) -> Result<()> {
        let d = self.width;
        if d == 0 || !rows.len().is_multiple_of(d) {
            return Err(Error::Invalid(format!(
                "activation batch of {} values is not a whole number of rows of width {d}",
                rows.len()
            )));
        }
        if let Some(pos) = rows.iter().position(|v| !v.is_finite()) {
            return Err(Error::Calibration {
                context: format!("an input of width {d}"),
                detail: format!(
                    "activation {} of token {} is {} (the dense model produces NaN/Inf on the calibration \
                     data: check the weights and the input ids)",
                    pos % d,
                    pos / d,
                    rows[pos]
                ),
            });
        }
        let n = rows.len() / d;
        let chunk = CHUNK_TOKENS.min(n.max(1));
        let mut x = Mat::<f32>::zeros(d, chunk);
        let mut product = Mat::<f32>::zeros(d, d);
        for start in (0..n).step_by(CHUNK_TOKENS) {
            let len = CHUNK_TOKENS.min(n - start);
            // Token-major rows are the columns of the d x len matrix X.
            for t in 0..len {
                let src = &rows[(start + t) * d..(start + t + 1) * d];
                x.col_as_slice_mut(t).copy_from_slice(src);
            }
            let xs = x.as_ref().subcols(0, len);
            triangular::matmul(
                product.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Replace,
                xs,
                BlockStructure::Rectangular,
                xs.transpose(),
                BlockStructure::Rectangular,
                1.0f32,
                gram_parallelism(d, len),
            );
            for j in 0..d {
                let src = &product.col_as_slice(j)[j..];
                let dst = &mut self.sum.col_as_slice_mut(j)[j..];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o += v as f64;
                }
            }
        }
        self.tokens += n as u64;
        Ok(())
    }

    /// Merges another accumulator of the same width (e.g. from another thread).
    pub fn merge(&mut self, other: &GramAccumulator) -> Result<()> {
        if other.width != self.width {
            return Err(Error::Invalid(format!(
                "cannot merge Gram matrices of widths {} and {}",
                self.width, other.width
            )));
        }
        self.sum += &other.sum;
        self.tokens += other.tokens;
        Ok(())
    }

    /// `H = 2 X X^T / N`, symmetric. Fails when no token was added.
    pub fn finish(&self) -> Result<Mat<f64>> {
        if self.tokens == 0 {
            return Err(Error::Calibration {
                context: format!("an input of width {}", self.width),
                detail: "no calibration tokens reached this layer (empty calibration data?)".into(),
            });
        }
        let scale = 2.0 / self.tokens as f64;
        let d = self.width;
        Ok(Mat::from_fn(d, d, |i, j| {
            let (r, c) = if i >= j { (i, j) } else { (j, i) };
            self.sum[(r, c)] * scale
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_product_across_batches() {
        let d = 5;
        let n = 1100; // crosses the chunk boundary
        let rows: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let mut acc = GramAccumulator::new(d);
        acc.add(&rows[..300 * d]).unwrap();
        acc.add(&rows[300 * d..]).unwrap();
        let h = acc.finish().unwrap();
        for i in 0..d {
            for j in 0..d {
                let term = |t: usize| rows[t * d + i] as f64 * rows[t * d + j] as f64;
                let direct: f64 = (0..n).map(term).sum::<f64>() * 2.0 / n as f64;
                let magnitude: f64 = (0..n).map(|t| term(t).abs()).sum::<f64>() * 2.0 / n as f64;
                // f32 products within a chunk: relative to the sum of |terms|.
                assert!(
                    (h[(i, j)] - direct).abs() <= 1e-6 * magnitude,
                    "{i},{j}: {} vs {direct}",
                    h[(i, j)]
                );
            }
        }
    }

    /// Byte-identical outputs: the chunk product gives the same bits on one thread
    /// and on the rayon pool.
    #[test]
    fn parallel_and_serial_products_are_bitwise_equal() {
        let (d, n) = (300, 512);
        let rows: Vec<f32> = (0..n * d)
            .map(|i| (((i * 7919) % 1009) as f32 - 504.0) / 97.0)
            .collect();
        let x = Mat::<f32>::from_fn(d, n, |r, t| rows[t * d + r]);
        let product = |par: Par| {
            let mut p = Mat::<f32>::zeros(d, d);
            triangular::matmul(
                p.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Replace,
                x.as_ref(),
                BlockStructure::Rectangular,
                x.transpose(),
                BlockStructure::Rectangular,
                1.0f32,
                par,
            );
            p
        };
        assert_eq!(gram_parallelism(d, n), Par::rayon(0));
        let (serial, parallel) = (product(Par::Seq), product(Par::rayon(2)));
        for j in 0..d {
            for i in j..d {
                assert_eq!(
                    serial[(i, j)].to_bits(),
                    parallel[(i, j)].to_bits(),
                    "{i},{j}"
                );
            }
        }
    }

    #[test]
    fn rejects_nan_and_ragged_batches() {
        let mut acc = GramAccumulator::new(3);
        assert!(acc.add(&[1.0, 2.0]).is_err());
        let err = acc.add(&[1.0, f32::NAN, 0.0]).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
        assert_eq!(acc.tokens(), 0);
        assert!(acc.finish().is_err());
    }
}
