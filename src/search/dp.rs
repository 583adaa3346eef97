//! The bucketed dynamic programme of ZIPLM.md section 6.
//!
//! Stage `l` picks one option `s` with time `t(l,s)` and cost `c(l,s)`; we minimise the
//! summed cost subject to the summed time staying within the budget. Times are
//! discretised into `buckets` buckets of size `budget / buckets`, rounding **up**, so
//! a solution the DP accepts never exceeds the budget in real (undiscretised) time
//! (up to a relative 1e-9 forgiven for floating-point noise).
//! `DP_l[b]` is the least cost of stages `1..=l` with discretised time exactly `b`.

/// One option of a stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpOption {
    /// Time in the budget's unit (>= 0).
    pub time: f64,
    /// Cost to minimise (finite).
    pub cost: f64,
}

/// The DP's answer: one option index per stage.
#[derive(Clone, Debug, PartialEq)]
pub struct DpSolution {
    /// Chosen option of each stage.
    pub choices: Vec<usize>,
    /// Summed cost.
    pub cost: f64,
    /// Summed (undiscretised) time.
    pub time: f64,
}

/// Number of buckets an option of `time` occupies at bucket size `beta`, or `None`
/// when it exceeds `buckets` on its own.
pub fn bucket_of(time: f64, beta: f64, buckets: usize) -> Option<usize> {
    if time <= 0.0 {
        return Some(0);
    }
    // Round up, forgiving a relative 1e-9 of floating-point noise so that times
    // summing exactly to the budget (e.g. the dense model at a 1.0x budget) still fit.
    let x = time / beta;
    let t = (x - 1e-9 * x.max(1.0)).ceil().max(0.0);
    (t <= buckets as f64).then_some(t as usize)
}

/// Solves the DP. Returns `None` when no combination fits the budget.
///
/// Ties go to the earlier option and, among equal totals, to the faster solution, so
/// the result is a deterministic function of the input.
///
/// # Panics
/// When a stage has more than 65,535 options, or `buckets` is 0.
pub fn solve(stages: &[Vec<DpOption>], budget: f64, buckets: usize) -> Option<DpSolution> {
    assert!(buckets > 0, "the DP needs at least one bucket");
    let n_b = buckets + 1;
    if budget.is_nan() || budget < 0.0 {
        return None;
    }
    // A zero budget only admits zero-time options: any positive beta works for them.
    let beta = if budget > 0.0 {
        budget / buckets as f64
    } else {
        1.0
    };
    let limit = if budget > 0.0 { buckets } else { 0 };
    let times: Vec<Vec<Option<usize>>> = stages
        .iter()
        .map(|opts| {
            assert!(
                opts.len() <= u16::MAX as usize,
                "too many options in one DP stage"
            );
            opts.iter()
                .map(|o| bucket_of(o.time, beta, limit))
                .collect()
        })
        .collect();

    let mut prev = vec![f64::INFINITY; n_b];
    let mut cur = vec![f64::INFINITY; n_b];
    prev[0] = 0.0;
    let mut reach = 0usize; // largest bucket reachable so far
    let mut choice = vec![0u16; stages.len() * n_b];
    for (l, opts) in stages.iter().enumerate() {
        cur[..].fill(f64::INFINITY);
        let row = &mut choice[l * n_b..(l + 1) * n_b];
        let mut new_reach = 0;
        for (s, (opt, t)) in opts.iter().zip(&times[l]).enumerate() {
            let Some(t) = *t else { continue };
            if t > limit {
                continue;
            }
            let hi = reach.min(limit - t); // source buckets 0..=hi
            let c = opt.cost;
            let src = &prev[..=hi];
            let dst = &mut cur[t..=t + hi];
            let ch = &mut row[t..=t + hi];
            for ((d, &p), k) in dst.iter_mut().zip(src).zip(ch.iter_mut()) {
                let v = p + c;
                if v < *d {
                    *d = v;
                    *k = s as u16;
                }
            }
            new_reach = new_reach.max(t + hi);
        }
        reach = new_reach;
        std::mem::swap(&mut prev, &mut cur);
        if prev[..=reach].iter().all(|v| v.is_infinite()) {
            return None;
        }
    }
    let (mut b, _) = prev[..=reach]
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .fold((usize::MAX, f64::INFINITY), |(bb, bv), (i, &v)| {
            if v < bv {
                (i, v)
            } else {
                (bb, bv)
            }
        });
    if b == usize::MAX {
        return None;
    }
    let mut choices = vec![0; stages.len()];
    for l in (0..stages.len()).rev() {
        let s = choice[l * n_b + b] as usize;
        choices[l] = s;
        b -= times[l][s].expect("a chosen option fits");
    }
    let cost = choices
        .iter()
        .enumerate()
        .map(|(l, &s)| stages[l][s].cost)
        .sum();
    let time = choices
        .iter()
        .enumerate()
        .map(|(l, &s)| stages[l][s].time)
        .sum();
    Some(DpSolution {
        choices,
        cost,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(stages: &[Vec<DpOption>], budget: f64, buckets: usize) -> Option<f64> {
        let beta = budget / buckets as f64;
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; stages.len()];
        loop {
            let mut t = 0usize;
            let mut ok = true;
            let mut c = 0.0;
            for (l, &s) in idx.iter().enumerate() {
                match bucket_of(stages[l][s].time, beta, buckets) {
                    Some(b) => t += b,
                    None => ok = false,
                }
                c += stages[l][s].cost;
            }
            if ok && t <= buckets && best.is_none_or(|b| c < b) {
                best = Some(c);
            }
            // next combination
            let mut l = 0;
            loop {
                if l == stages.len() {
                    return best;
                }
                idx[l] += 1;
                if idx[l] < stages[l].len() {
                    break;
                }
                idx[l] = 0;
                l += 1;
            }
        }
    }

    #[test]
    fn small_exhaustive_instances_match_brute_force() {
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64) / (1u64 << 31) as f64
        };
        for case in 0..200 {
            let n_stages = 1 + case % 4;
            let stages: Vec<Vec<DpOption>> = (0..n_stages)
                .map(|_| {
                    let n = 1 + (rnd() * 4.0) as usize;
                    (0..n)
                        .map(|_| DpOption {
                            time: (rnd() * 10.0).floor(),
                            cost: rnd(),
                        })
                        .collect()
                })
                .collect();
            let budget = 5.0 + (rnd() * 25.0).floor();
            let buckets = budget as usize; // beta = 1: integer times are exact
            let dp = solve(&stages, budget, buckets);
            let bf = brute(&stages, budget, buckets);
            match (dp, bf) {
                (None, None) => {}
                (Some(d), Some(b)) => {
                    assert!(
                        (d.cost - b).abs() < 1e-12,
                        "case {case}: dp {} brute {b}",
                        d.cost
                    );
                    assert!(d.time <= budget);
                }
                (d, b) => panic!("case {case}: dp {d:?} brute {b:?}"),
            }
        }
    }

    #[test]
    fn zero_budget_takes_zero_time_options() {
        let stages = vec![vec![
            DpOption {
                time: 1.0,
                cost: 0.0,
            },
            DpOption {
                time: 0.0,
                cost: 1.0,
            },
        ]];
        let s = solve(&stages, 0.0, 100).unwrap();
        assert_eq!(s.choices, vec![1]);
        let stages = vec![vec![DpOption {
            time: 1.0,
            cost: 0.0,
        }]];
        assert!(solve(&stages, 0.0, 100).is_none());
    }
}
