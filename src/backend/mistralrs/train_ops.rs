//! The training forward's ops with their own backward passes: the attention softmax
//! (scale and mask folded in), the logits' KL divergence, RMS norm and RoPE.
//!
//! candle's fused CPU kernels for these have no backward pass, and its composed ones
//! walk the logits (`[tokens, vocabulary]`, 100 MB a window for SmolLM2 at 512 tokens)
//! and every layer's attention scores several times each way, one freshly allocated
//! tensor and one thread per op: in a profile of recovery, about two thirds of a step's
//! wall time was outside the matrix multiplies. Each op here is one pass forward and one
//! backward, rows split across the rayon pool and each row computed whole by one thread,
//! so results do not depend on the thread count. Every op is checked against candle's
//! composed version and its gradient against finite differences in f64 (tests below, and
//! `recovery::differentiable_forward_matches_finite_differences` for the whole model).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(scale * x + mask)` over the last dimension, differentiable in `x`: the
/// attention probabilities of scores `x: [.., tq, tk]` under an additive `mask: [tq,
/// tk]` (`-inf` where a query may not look: probability 0, gradient 0). The backward
/// pass is `dx = scale * y * (g - sum(g * y))` row by row; the mask gets no gradient.
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || mask.dims() != &dims[dims.len() - 2..] {
        candle_core::bail!(
            "masked_softmax: mask {:?} is not the last two dimensions of {:?}",
            mask.dims(),
            dims
        );
    }
    x.contiguous()?.apply_op2(
        &mask.detach().to_dtype(x.dtype())?.contiguous()?,
        MaskedSoftmax { scale },
    )
}

/// Per row of the last dimension, `KL(softmax(teacher) || softmax(student))`: shape
/// `student.dims()[..last]`. The gradient reaches `student` only
/// (`softmax(student) - softmax(teacher)` times the row's incoming gradient); `teacher`
/// is a constant target.
pub fn kl_rows(student: &Tensor, teacher: &Tensor) -> candle_core::Result<Tensor> {
    if student.dims() != teacher.dims() {
        candle_core::bail!(
            "kl_rows: student {:?} and teacher {:?} differ in shape",
            student.dims(),
            teacher.dims()
        );
    }
    student
        .contiguous()?
        .apply_op2(&teacher.detach().contiguous()?, KlRows::default())
}

/// RMS normalisation over the last dimension, `x / sqrt(mean(x^2) + eps) * alpha`,
/// differentiable in `x` and `alpha`.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if alpha.dims() != [d] {
        candle_core::bail!("rms_norm: alpha {:?} for rows of {d}", alpha.dims());
    }
    x.contiguous()?
        .apply_op2(&alpha.contiguous()?, RmsNorm { eps: eps as f64 })
}

/// Interleaved rotary embedding of `x: [b, heads, t, d]` with tables `cos, sin: [>= t,
/// d / 2]` (llama.cpp's layout, candle's `rope_i`), differentiable in `x`: the backward
/// pass is the rotation by the opposite angle. The tables get no gradient.
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (rows, half) = cos.dims2()?;
    if d % 2 != 0 || half * 2 != d || rows < t || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope_i: tables {:?} / {:?} for {t} positions of width {d}",
            cos.dims(),
            sin.dims()
        );
    }
    let cos = cos.detach().narrow(0, 0, t)?.contiguous()?;
    let sin = sin.detach().narrow(0, 0, t)?.contiguous()?;
    x.contiguous()?
        .apply_op3(&cos, &sin, Rope { inverse: false })
}

/// The float types the ops run in (f32 in training, f64 in gradient checks).
trait Real: candle_core::WithDType + Send + Sync {
    fn exp(self) -> Self;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The contiguous elements of `storage` under `layout`.
fn slice<'a, T: Real>(s: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("train_ops: input is not contiguous"),
    }
}

/// The contiguous elements of an op's other input, of the first input's type.
fn input<'a, T: Real>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    slice(T::cpu_storage_as_slice(s)?, layout)
}

/// Row `r` of `x` in rows of `w`.
fn row<T>(x: &[T], r: usize, w: usize) -> &[T] {
    &x[r * w..][..w]
}

/// A new tensor of `len` entries whose rows of `w` are filled in parallel by
/// `fill(row index, row)`, each row by one thread.
fn fill_rows<T: Real>(len: usize, w: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> CpuStorage {
    let mut out = vec![T::from_f64(0.0); len];
    out.par_chunks_mut(w)
        .enumerate()
        .for_each(|(r, out)| fill(r, out));
    T::to_cpu_storage_owned(out)
}

/// The width of the last dimension (at least 1).
fn row_width(layout: &Layout) -> usize {
    layout.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// `log sum exp(row)`: exponentials in the row's type, their sum in f64.
fn log_sum_exp<T: Real>(row: &[T]) -> f64 {
    let max = row_max(row);
    let sum: f64 = row.iter().map(|&v| (v - max).exp().to_f64()).sum();
    max.to_f64() + sum.ln()
}

/// The largest entry (`-inf` for an empty row).
fn row_max<T: Real>(row: &[T]) -> T {
    row.iter().copied().fold(
        T::from_f64(f64::NEG_INFINITY),
        |m, v| if v > m { v } else { m },
    )
}

/// Softmax of `row` in place (`-inf` entries get 0).
fn softmax_in_place<T: Real>(row: &mut [T]) {
    let max = row_max(row);
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += v.to_f64();
    }
    let inv = T::from_f64(1.0 / sum);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

macro_rules! dispatch {
    ($name:literal, $s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            _ => candle_core::bail!(concat!($name, ": f32 or f64 only")),
        }
    };
}

struct MaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "ziplm-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: &[T],
            xl: &Layout,
            (m, ml): (&CpuStorage, &Layout),
            scale: f64,
        ) -> candle_core::Result<CpuStorage> {
            let (x, m) = (slice(x, xl)?, input::<T>(m, ml)?);
            let w = row_width(xl);
            let mask_rows = (m.len() / w).max(1);
            let scale = T::from_f64(scale);
            Ok(fill_rows(x.len(), w, |r, y: &mut [T]| {
                let (x, m) = (row(x, r, w), row(m, r % mask_rows, w));
                for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
                    *y = x * scale + m;
                }
                softmax_in_place(y);
            }))
        }
        Ok((
            dispatch!("masked_softmax", xs, |v| run(v, xl, (ms, ml), self.scale)?),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// `(y, g) -> scale * y * (g - sum(g * y))` per row.
struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "ziplm-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            y: &[T],
            yl: &Layout,
            (g, gl): (&CpuStorage, &Layout),
            scale: f64,
        ) -> candle_core::Result<CpuStorage> {
            let (y, g) = (slice(y, yl)?, input::<T>(g, gl)?);
            let w = row_width(yl);
            let scale = T::from_f64(scale);
            Ok(fill_rows(y.len(), w, |r, dx: &mut [T]| {
                let (y, g) = (row(y, r, w), row(g, r, w));
                let dot: f64 = y.iter().zip(g).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                let dot = T::from_f64(dot);
                for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *d = scale * y * (g - dot);
                }
            }))
        }
        Ok((
            dispatch!("softmax backward", ys, |v| run(
                v,
                yl,
                (gs, gl),
                self.scale
            )?),
            yl.shape().clone(),
        ))
    }
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ziplm-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: &[T],
            xl: &Layout,
            (a, al): (&CpuStorage, &Layout),
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let (x, a) = (slice(x, xl)?, input::<T>(a, al)?);
            let w = row_width(xl);
            Ok(fill_rows(x.len(), w, |r, y: &mut [T]| {
                let x = row(x, r, w);
                let inv = T::from_f64(inverse_rms(x, eps));
                for ((y, &x), &a) in y.iter_mut().zip(x).zip(a) {
                    *y = x * inv * a;
                }
            }))
        }
        Ok((
            dispatch!("rms_norm", xs, |v| run(v, xl, (a, al), self.eps)?),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let op = RmsNormBackward { eps: self.eps };
        let dx = x.apply_op3_no_bwd(alpha, &g, &op)?;
        // d alpha = sum over rows of g * x / rms: small (one row), summed in order.
        let w = alpha.dim(0)?;
        let normed = x.apply_op2_no_bwd(
            &Tensor::ones(w, x.dtype(), x.device())?,
            &RmsNorm { eps: self.eps },
        )?;
        let rows = x.elem_count() / w.max(1);
        let dalpha = (normed.reshape((rows, w))? * g.reshape((rows, w))?)?.sum(0)?;
        Ok((Some(dx), Some(dalpha)))
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, in f64.
fn inverse_rms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ms = x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / x.len().max(1) as f64;
    1.0 / (ms + eps).sqrt()
}

/// `(x, alpha, g) -> dx = r * (g * alpha - n * mean(g * alpha * n))` per row, with `r`
/// the row's inverse RMS and `n = x * r`.
struct RmsNormBackward {
    eps: f64,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "ziplm-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: &[T],
            xl: &Layout,
            (a, al): (&CpuStorage, &Layout),
            (g, gl): (&CpuStorage, &Layout),
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let (x, a, g) = (slice(x, xl)?, input::<T>(a, al)?, input::<T>(g, gl)?);
            let w = row_width(xl);
            Ok(fill_rows(x.len(), w, |row_index, dx: &mut [T]| {
                let (x, g) = (row(x, row_index, w), row(g, row_index, w));
                let r = inverse_rms(x, eps);
                let mean: f64 = x
                    .iter()
                    .zip(g)
                    .zip(a)
                    .map(|((x, g), a)| g.to_f64() * a.to_f64() * x.to_f64() * r)
                    .sum::<f64>()
                    / w as f64;
                for (((d, x), g), a) in dx.iter_mut().zip(x).zip(g).zip(a) {
                    let n = x.to_f64() * r;
                    *d = T::from_f64(r * (g.to_f64() * a.to_f64() - n * mean));
                }
            }))
        }
        Ok((
            dispatch!("rms_norm backward", xs, |v| run(
                v,
                xl,
                (a, al),
                (gs, gl),
                self.eps
            )?),
            xl.shape().clone(),
        ))
    }
}

/// Interleaved RoPE by the tables' angles, or by their opposites (`inverse`: the
/// backward pass).
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ziplm-rope-i"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: &[T],
            xl: &Layout,
            (c, cl): (&CpuStorage, &Layout),
            (s, sl): (&CpuStorage, &Layout),
            inverse: bool,
        ) -> candle_core::Result<CpuStorage> {
            let (x, c, s) = (slice(x, xl)?, input::<T>(c, cl)?, input::<T>(s, sl)?);
            let d = row_width(xl);
            let t = xl.shape().dims()[2];
            let half = d / 2;
            Ok(fill_rows(x.len(), d, |r, y: &mut [T]| {
                let x = row(x, r, d);
                let (c, s) = (row(c, r % t, half), row(s, r % t, half));
                for i in 0..half {
                    let (x0, x1) = (x[2 * i], x[2 * i + 1]);
                    let (c, s) = (
                        c[i],
                        if inverse {
                            T::from_f64(0.0) - s[i]
                        } else {
                            s[i]
                        },
                    );
                    y[2 * i] = x0 * c - x1 * s;
                    y[2 * i + 1] = x0 * s + x1 * c;
                }
            }))
        }
        Ok((
            dispatch!("rope_i", xs, |v| run(
                v,
                xl,
                (cs, cl),
                (ss, sl),
                self.inverse
            )?),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Rope {
            inverse: !self.inverse,
        };
        Ok((
            Some(g.contiguous()?.apply_op3_no_bwd(cos, sin, &op)?),
            None,
            None,
        ))
    }
}

/// The forward remembers each row's log-normalisers `(log sum exp(s), log sum exp(t))`
/// for the backward pass.
#[derive(Default)]
struct KlRows {
    norms: std::sync::Mutex<Vec<(f64, f64)>>,
}

impl CustomOp2 for KlRows {
    fn name(&self) -> &'static str {
        "ziplm-kl-rows"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            s: &[T],
            sl: &Layout,
            (t, tl): (&CpuStorage, &Layout),
            norms: &mut Vec<(f64, f64)>,
        ) -> candle_core::Result<CpuStorage> {
            let s = slice(s, sl)?;
            let t = input::<T>(t, tl)?;
            let w = row_width(sl);
            let rows: Vec<(f64, (f64, f64))> = s
                .par_chunks(w)
                .zip(t.par_chunks(w))
                .map(|(s, t)| {
                    let (ns, nt) = (log_sum_exp(s), log_sum_exp(t));
                    // sum p_t (log p_t - log p_s), log p = x - log sum exp(x).
                    let kl: f64 = s
                        .iter()
                        .zip(t)
                        .map(|(&s, &t)| {
                            let log_t = t.to_f64() - nt;
                            let p = T::from_f64(log_t).exp().to_f64();
                            if p == 0.0 {
                                0.0
                            } else {
                                p * (log_t - (s.to_f64() - ns))
                            }
                        })
                        .sum();
                    (kl, (ns, nt))
                })
                .collect();
            *norms = rows.iter().map(|r| r.1).collect();
            Ok(T::to_cpu_storage_owned(
                rows.iter().map(|r| T::from_f64(r.0)).collect(),
            ))
        }
        let dims = sl.shape().dims();
        let rows = Shape::from_dims(&dims[..dims.len().saturating_sub(1)]);
        let mut norms = self
            .norms
            .lock()
            .map_err(|_| candle_core::Error::Msg("kl_rows: poisoned lock".into()))?;
        Ok((
            dispatch!("kl_rows", ss, |v| run(v, sl, (ts, tl), &mut norms)?),
            rows,
        ))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let norms = self
            .norms
            .lock()
            .map_err(|_| candle_core::Error::Msg("kl_rows: poisoned lock".into()))?
            .clone();
        let g = g
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if g.len() != norms.len() {
            candle_core::bail!("kl_rows: backward before forward");
        }
        let rows = norms
            .into_iter()
            .zip(g)
            .map(|((ns, nt), g)| (ns, nt, g))
            .collect();
        let ds = s.apply_op2_no_bwd(t, &KlRowsBackward { rows })?;
        Ok((Some(ds), None))
    }
}

/// `(s, t) -> (softmax(s) - softmax(t)) * g` per row, from the rows' log-normalisers
/// and incoming gradients `(ns, nt, g)`.
struct KlRowsBackward {
    rows: Vec<(f64, f64, f64)>,
}

impl CustomOp2 for KlRowsBackward {
    fn name(&self) -> &'static str {
        "ziplm-kl-rows-backward"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            s: &[T],
            sl: &Layout,
            (t, tl): (&CpuStorage, &Layout),
            rows: &[(f64, f64, f64)],
        ) -> candle_core::Result<CpuStorage> {
            let (s, t) = (slice(s, sl)?, input::<T>(t, tl)?);
            let w = row_width(sl);
            Ok(fill_rows(s.len(), w, |r, ds: &mut [T]| {
                let (s, t) = (row(s, r, w), row(t, r, w));
                let (ns, nt, g) = rows[r];
                let (ns, nt, g) = (T::from_f64(ns), T::from_f64(nt), T::from_f64(g));
                for ((d, &s), &t) in ds.iter_mut().zip(s).zip(t) {
                    *d = ((s - ns).exp() - (t - nt).exp()) * g;
                }
            }))
        }
        Ok((
            dispatch!("kl_rows backward", ss, |v| run(
                v,
                sl,
                (ts, tl),
                &self.rows
            )?),
            sl.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mistralrs::llama::random_tensor;
    use candle_core::{DType, Device, Var, D};

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol, "[{i}]: {x} vs {y}");
        }
    }

    /// Central finite differences of `f` (a scalar of `x`) at a few entries, against
    /// the backward pass.
    fn check_gradient(x: &Var, f: &dyn Fn(&Tensor) -> Tensor) {
        let grads = f(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("the op passes a gradient on")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for k in [0, 1, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                f(&t).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (g[k] - fd).abs() <= 1e-7 + 1e-5 * fd.abs(),
                "[{k}]: backward {} vs finite difference {fd}",
                g[k]
            );
        }
    }

    /// The additive causal mask `[t, t]`.
    fn causal(t: usize) -> Tensor {
        let v: Vec<f64> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn masked_softmax_matches_candles_composed_softmax_and_finite_differences() {
        let (mask, scale) = (causal(7), 0.125);
        let x = random_tensor(&[2, 3, 7, 7], 11, DType::F64);
        let composed = |x: &Tensor| {
            let s = (x * scale).unwrap().broadcast_add(&mask).unwrap();
            candle_nn::ops::softmax(&s, D::Minus1).unwrap()
        };
        let y = masked_softmax(&x, &mask, scale).unwrap();
        close(&y, &composed(&x), 1e-12);
        // Masked entries get probability 0 (query 0 sees key 0 only).
        let first = y.get(1).unwrap().get(2).unwrap().get(0).unwrap();
        assert_eq!(first.to_vec1::<f64>().unwrap()[1..], [0.0; 6]);
        // The gradient, under a different weight on every probability.
        let weights = random_tensor(&[2, 3, 7, 7], 12, DType::F64);
        let v = Var::from_tensor(&x).unwrap();
        let f = |x: &Tensor| {
            let y = masked_softmax(x, &mask, scale).unwrap();
            (y * &weights).unwrap().sum_all().unwrap()
        };
        check_gradient(&v, &f);
        // f32 runs the same pass.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let mask32 = mask.to_dtype(DType::F32).unwrap();
        close(
            &masked_softmax(&x32, &mask32, scale)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
            &composed(&x),
            1e-6,
        );
        // A mask of the wrong shape is an error, not a panic.
        assert!(masked_softmax(&x, &causal(6), scale).is_err());
    }

    #[test]
    fn rms_norm_matches_candles_composed_norm_and_finite_differences() {
        let x = random_tensor(&[2, 3, 8], 31, DType::F64);
        let alpha = (random_tensor(&[8], 32, DType::F64) + 1.0).unwrap();
        let y = rms_norm(&x, &alpha, 1e-5).unwrap();
        close(
            &y,
            &candle_nn::ops::rms_norm_slow(&x, &alpha, 1e-5).unwrap(),
            1e-12,
        );
        let weights = random_tensor(&[2, 3, 8], 33, DType::F64);
        let v = Var::from_tensor(&x).unwrap();
        check_gradient(&v, &|x| {
            let y = rms_norm(x, &alpha, 1e-5).unwrap();
            (y * &weights).unwrap().sum_all().unwrap()
        });
        let a = Var::from_tensor(&alpha).unwrap();
        check_gradient(&a, &|a| {
            let y = rms_norm(&x, a, 1e-5).unwrap();
            (y * &weights).unwrap().sum_all().unwrap()
        });
        assert!(rms_norm(&x, &random_tensor(&[7], 34, DType::F64), 1e-5).is_err());
    }

    #[test]
    fn rope_matches_candles_rope_and_finite_differences() {
        let x = random_tensor(&[1, 3, 5, 8], 41, DType::F64);
        // Tables longer than the sequence: the first 5 rows are used.
        let (cos, sin) = (
            random_tensor(&[6, 4], 42, DType::F64),
            random_tensor(&[6, 4], 43, DType::F64),
        );
        let (c5, s5) = (cos.narrow(0, 0, 5).unwrap(), sin.narrow(0, 0, 5).unwrap());
        close(
            &rope_i(&x, &cos, &sin).unwrap(),
            &candle_nn::rotary_emb::rope_i_slow(&x, &c5, &s5).unwrap(),
            1e-12,
        );
        let weights = random_tensor(&[1, 3, 5, 8], 44, DType::F64);
        let v = Var::from_tensor(&x).unwrap();
        check_gradient(&v, &|x| {
            let y = rope_i(x, &cos, &sin).unwrap();
            (y * &weights).unwrap().sum_all().unwrap()
        });
        assert!(rope_i(&x, &cos.narrow(0, 0, 4).unwrap(), &sin).is_err());
    }

    #[test]
    fn kl_rows_matches_the_composed_kl_and_finite_differences() {
        let s = random_tensor(&[5, 11], 21, DType::F64);
        let t = random_tensor(&[5, 11], 22, DType::F64);
        let log_s = candle_nn::ops::log_softmax(&s, D::Minus1).unwrap();
        let log_t = candle_nn::ops::log_softmax(&t, D::Minus1).unwrap();
        let composed = (log_t.exp().unwrap() * (&log_t - &log_s).unwrap())
            .unwrap()
            .sum(D::Minus1)
            .unwrap();
        let fused = kl_rows(&s, &t).unwrap();
        assert_eq!(fused.dims(), &[5]);
        close(&fused, &composed, 1e-12);
        // KL of a distribution with itself is 0, and positive otherwise.
        close(
            &kl_rows(&t, &t).unwrap(),
            &Tensor::zeros(5, DType::F64, &Device::Cpu).unwrap(),
            1e-12,
        );
        assert!(fused.to_vec1::<f64>().unwrap().iter().all(|&k| k > 0.0));
        // The gradient, with a different weight on every row.
        let rows = random_tensor(&[5], 23, DType::F64);
        let x = Var::from_tensor(&s).unwrap();
        let f = |x: &Tensor| {
            (kl_rows(x, &t).unwrap() * &rows)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        check_gradient(&x, &f);
        // The teacher gets no gradient.
        let tv = Var::from_tensor(&t).unwrap();
        let grads = kl_rows(&s, tv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(tv.as_tensor()).is_none());
        // Mismatched shapes are an error, not a panic.
        assert!(kl_rows(&s, &random_tensor(&[5, 10], 24, DType::F64)).is_err());
    }
}
