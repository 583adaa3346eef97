//! The quality-vs-speed frontier: measured points of several pruning methods, written
//! as a CSV table and an SVG plot (quality against measured speedup).
//!
//! The measuring itself is backend work (see `examples/frontier.rs`); this module
//! only holds the points and renders them, so the files are the same whoever
//! produced the figures.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// One measured model on the frontier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    /// Method name (`dense`, `ziplm`, `magnitude`, `uniform`, `layer-drop`).
    pub method: String,
    /// Speedup target asked for (1.0 for the dense model).
    pub target: f64,
    /// Predicted latency of the selection (ms), from the latency table.
    pub predicted_ms: f64,
    /// Measured latency of the dense model in the same timing run (ms, median).
    pub dense_ms: f64,
    /// Measured latency of this model (ms, median).
    pub measured_ms: f64,
    /// Quality metric (higher is better for STS Spearman; see `metric`).
    pub quality: f64,
    /// Name of the quality metric, e.g. `sts-b dev spearman x100`.
    pub metric: String,
    /// The measured speedup as verification reads it: the median of the timing run's
    /// rounds' dense/model ratios. `None` (the dense point, older files): the ratio of
    /// the two medians.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_speedup: Option<f64>,
}

impl FrontierPoint {
    /// Measured speedup: [`FrontierPoint::measured_speedup`], else dense / pruned
    /// medians, both timed in the same run.
    pub fn speedup(&self) -> f64 {
        self.measured_speedup
            .unwrap_or(self.dense_ms / self.measured_ms)
    }
}

/// A baseline model's measurement, as an example's runtime gives it: the dense and the
/// model's medians from one alternating run (ms) and the model's quality.
pub struct Measured {
    /// Dense median (ms).
    pub dense_ms: f64,
    /// The model's median (ms).
    pub measured_ms: f64,
    /// The median of the run's rounds' dense/model ratios.
    pub speedup: f64,
    /// Its quality.
    pub quality: f64,
}

/// The frontier points of the baseline `methods` at one ZipLM outcome: each baseline
/// ([`crate::baselines::baseline_model`]) aims at `budget` (ZipLM's final search budget)
/// and is emitted and measured by `measure` (given the method, its plan and weights).
/// Methods with no model within the budget are skipped.
#[allow(clippy::too_many_arguments)]
pub fn baseline_points(
    database: &crate::database::Database,
    problem: &crate::search::SearchProblem,
    ziplm: &crate::search::Selection,
    budget: crate::search::Budget,
    buckets: usize,
    methods: &[String],
    (target, metric): (f64, &str),
    mut measure: impl FnMut(
        &str,
        &ziplm_plugin_api::Plan,
        &ziplm_plugin_api::PrunedWeights,
    ) -> Result<Measured>,
) -> Result<Vec<FrontierPoint>> {
    let mut points = vec![];
    for method in methods {
        let Some(b) =
            crate::baselines::baseline_model(database, problem, method, ziplm, budget, buckets)?
        else {
            continue;
        };
        let m = measure(method, &b.plan, &b.weights)?;
        points.push(FrontierPoint {
            method: method.clone(),
            target,
            predicted_ms: problem.time_of(&b.selection),
            dense_ms: m.dense_ms,
            measured_ms: m.measured_ms,
            quality: m.quality,
            metric: metric.into(),
            measured_speedup: Some(m.speedup),
        });
    }
    Ok(points)
}

/// The CSV form: a header and one row per point, in the given order.
pub fn to_csv(points: &[FrontierPoint]) -> String {
    let mut s = String::from(
        "method,target,predicted_ms,dense_ms,measured_ms,measured_speedup,metric,quality\n",
    );
    for p in points {
        let _ = writeln!(
            s,
            "{},{:.2},{:.4},{:.4},{:.4},{:.3},{},{:.3}",
            p.method,
            p.target,
            p.predicted_ms,
            p.dense_ms,
            p.measured_ms,
            p.speedup(),
            p.metric,
            p.quality
        );
    }
    s
}

/// A markdown table of the points (for reports and the README), the quality with
/// `decimals` digits, headed by the metric of the first point.
pub fn to_markdown(points: &[FrontierPoint], decimals: usize) -> String {
    let metric = points
        .first()
        .map(|p| p.metric.as_str())
        .unwrap_or("quality");
    let mut s = format!(
        "| method | target | measured speedup | predicted ms | measured ms | {metric} |\n|---|---|---|---|---|---|\n"
    );
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {:.2}x | {:.2}x | {:.2} | {:.2} | {:.decimals$} |",
            p.method,
            p.target,
            p.speedup(),
            p.predicted_ms,
            p.measured_ms,
            p.quality
        );
    }
    s
}

/// Writes `NAME.csv`, `NAME.json` and `NAME.svg` into `dir` (each atomically).
pub fn write(dir: &Path, name: &str, title: &str, points: &[FrontierPoint]) -> Result<()> {
    crate::fsutil::write_atomic(&dir.join(format!("{name}.csv")), to_csv(points).as_bytes())?;
    crate::fsutil::write_json_atomic(&dir.join(format!("{name}.json")), &points)?;
    crate::fsutil::write_atomic(
        &dir.join(format!("{name}.svg")),
        to_svg(title, points)?.as_bytes(),
    )
}

/// An SVG scatter-and-line plot: quality against measured speedup, one series per
/// method (points sorted by speedup), the dense model as a black marker.
pub fn to_svg(title: &str, points: &[FrontierPoint]) -> Result<String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("drawing the frontier plot: {e}"));
    let mut methods: Vec<&str> = vec![];
    for p in points {
        if p.method != "dense" && !methods.contains(&p.method.as_str()) {
            methods.push(&p.method);
        }
    }
    let (mut x0, mut x1, mut y0, mut y1) = (1.0f64, 1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for p in points {
        x0 = x0.min(p.speedup());
        x1 = x1.max(p.speedup());
        y0 = y0.min(p.quality);
        y1 = y1.max(p.quality);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.08).max(0.5);
    let metric = points.first().map(|p| p.metric.clone()).unwrap_or_default();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((x0 - 0.05)..(x1 + 0.1), (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("measured speedup (dense / pruned, same timing run)")
            .y_desc(metric.as_str())
            .draw()
            .map_err(|e| err(&e))?;
        for (i, m) in methods.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.method == *m)
                .map(|p| (p.speedup(), p.quality))
                .collect();
            series.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*m)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    series
                        .into_iter()
                        .map(|xy| Circle::new(xy, 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        if let Some(d) = points.iter().find(|p| p.method == "dense") {
            chart
                .draw_series(std::iter::once(Cross::new(
                    (d.speedup(), d.quality),
                    7,
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| err(&e))?
                .label("dense")
                .legend(|(x, y)| Cross::new((x + 9, y), 5, BLACK.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(method: &str, target: f64, measured_ms: f64, quality: f64) -> FrontierPoint {
        FrontierPoint {
            method: method.into(),
            target,
            predicted_ms: measured_ms,
            dense_ms: 10.0,
            measured_ms,
            quality,
            metric: "sts".into(),
            measured_speedup: None,
        }
    }

    #[test]
    fn csv_has_a_row_per_point_with_the_measured_speedup() {
        let csv = to_csv(&[
            point("dense", 1.0, 10.0, 80.0),
            point("ziplm", 2.0, 4.0, 78.5),
        ]);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2], "ziplm,2.00,4.0000,10.0000,4.0000,2.500,sts,78.500");
        // A point with its rounds' median ratio reports that, not the medians' ratio.
        let paired = FrontierPoint {
            measured_speedup: Some(2.25),
            ..point("ziplm", 2.0, 4.0, 78.5)
        };
        let csv = to_csv(&[paired]);
        assert_eq!(
            csv.lines().nth(1),
            Some("ziplm,2.00,4.0000,10.0000,4.0000,2.250,sts,78.500")
        );
    }

    #[test]
    fn svg_names_every_method() {
        let svg = to_svg(
            "t",
            &[
                point("dense", 1.0, 10.0, 80.0),
                point("ziplm", 2.0, 5.0, 78.0),
                point("magnitude", 2.0, 5.2, 70.0),
            ],
        )
        .unwrap();
        assert!(
            svg.contains("<svg")
                && svg.contains("ziplm")
                && svg.contains("magnitude")
                && svg.contains("dense")
        );
    }
}
