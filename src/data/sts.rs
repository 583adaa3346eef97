//! STS Benchmark: reading pairs and scoring embeddings (Spearman x 100).

use crate::error::{Error, Result};
use std::path::Path;

/// A sentence pair with its gold similarity (0-5).
#[derive(Clone, Debug, PartialEq)]
pub struct StsPair {
    /// Gold score.
    pub score: f64,
    /// First sentence.
    pub a: String,
    /// Second sentence.
    pub b: String,
}

/// Reads an STS Benchmark file (tab-separated: genre, file, year, id, score, sentence
/// 1, sentence 2; extra columns ignored).
pub fn read_pairs(path: &Path) -> Result<Vec<StsPair>> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, line) in content
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 7 {
            return Err(Error::Format {
                path: path.into(),
                detail: format!("line {}: {} tab-separated columns, expected 7 (genre, file, year, id, score, s1, s2)", i + 1, cols.len()),
            });
        }
        let score: f64 = cols[4].trim().parse().map_err(|_| Error::Format {
            path: path.into(),
            detail: format!("line {}: score `{}` is not a number", i + 1, cols[4]),
        })?;
        out.push(StsPair {
            score,
            a: cols[5].to_string(),
            b: cols[6].to_string(),
        });
    }
    Ok(out)
}

/// Ranks with ties averaged (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt().max(f64::MIN_POSITIVE)
}

/// Spearman rank correlation.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += *x as f64 * *y as f64;
        na += *x as f64 * *x as f64;
        nb += *y as f64 * *y as f64;
    }
    d / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Embeds a batch of sentences (one vector each).
pub type Embed<'a> = dyn FnMut(&[String]) -> Result<Vec<Vec<f32>>> + 'a;

/// STS score: Spearman correlation (x 100) between the cosine similarity of the
/// embeddings of each pair and the gold score. `embed` maps sentences to embeddings.
pub fn evaluate(pairs: &[StsPair], embed: &mut Embed<'_>) -> Result<f64> {
    if pairs.is_empty() {
        return Err(Error::Invalid("no STS pairs to evaluate".into()));
    }
    let sentences: Vec<String> = pairs
        .iter()
        .flat_map(|p| [p.a.clone(), p.b.clone()])
        .collect();
    let emb = embed(&sentences)?;
    let sims: Vec<f64> = (0..pairs.len())
        .map(|i| cosine(&emb[2 * i], &emb[2 * i + 1]))
        .collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.score).collect();
    Ok(100.0 * spearman(&sims, &gold))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_handles_ties_and_monotone_maps() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&x, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
    }
}
