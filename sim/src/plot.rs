//! Plots, as SVG and PNG (plotters): the completion-time CDF with the lower bound drawn,
//! the master's egress over time, the per-node upload distribution, and the sweep plots.
//!
//! Text is drawn with DejaVu Sans, shipped in `sim/assets/` (its licence beside it), so PNGs
//! have labels on machines without fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// What failed.
    pub message: String,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in and known good; failing to register it only loses labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

const SIZE: (u32, u32) = (900, 560);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Draw<'a> = dyn Fn(&DrawingArea<SVGBackend, Shift>) -> Result<(), String> + 'a;
type DrawPng<'a> = dyn Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String> + 'a;

/// Draws the same picture to `stem.svg` and `stem.png`.
fn both(stem: &Path, svg: &Draw, png: &DrawPng) -> Result<(), PlotError> {
    register_font();
    let err = |p: &Path, m: String| PlotError {
        path: p.display().to_string(),
        message: m,
    };
    let svg_path = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg_path, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| err(&svg_path, e.to_string()))?;
        svg(&root).map_err(|m| err(&svg_path, m))?;
        root.present().map_err(|e| err(&svg_path, e.to_string()))?;
    }
    let png_path = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png_path, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| err(&png_path, e.to_string()))?;
        png(&root).map_err(|m| err(&png_path, m))?;
        root.present().map_err(|e| err(&png_path, e.to_string()))?;
    }
    Ok(())
}

fn max_of(v: impl Iterator<Item = f64>) -> f64 {
    v.filter(|x| x.is_finite()).fold(0.0, f64::max)
}

/// Completion-time CDFs (one line per labelled series) with the lower bound as a dashed
/// vertical line.
pub fn completion_cdf(
    stem: &Path,
    title: &str,
    series: &[(String, Vec<f64>)],
    bound: f64,
) -> Result<(), PlotError> {
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        series: &[(String, Vec<f64>)],
        bound: f64,
    ) -> Result<(), String> {
        let xmax = max_of(series.iter().flat_map(|s| s.1.iter().copied()))
            .max(bound)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xmax, 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("completion time (s)")
            .y_desc("share of nodes done")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, times)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let n = times.len().max(1) as f64;
            let mut pts = vec![(0.0, 0.0)];
            for (k, t) in times.iter().enumerate() {
                pts.push((*t, k as f64 / n));
                pts.push((*t, (k + 1) as f64 / n));
            }
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        let dashes: Vec<PathElement<(f64, f64)>> = (0..20)
            .map(|k| {
                let y0 = k as f64 / 20.0;
                PathElement::new([(bound, y0), (bound, y0 + 0.025)], BLACK.stroke_width(2))
            })
            .collect();
        chart
            .draw_series(dashes)
            .map_err(|e| e.to_string())?
            .label(format!("lower bound {bound:.1} s"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    both(stem, &|r| draw(r, title, series, bound), &|r| {
        draw(r, title, series, bound)
    })
}

/// Master egress per second (bytes per second in, MiB/s drawn), one line per series.
pub fn master_egress(
    stem: &Path,
    title: &str,
    series: &[(String, Vec<f64>)],
    capacity: f64,
) -> Result<(), PlotError> {
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        series: &[(String, Vec<f64>)],
        capacity: f64,
    ) -> Result<(), String> {
        let mib = 1048576.0;
        let xmax = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1) as f64;
        let ymax = max_of(series.iter().flat_map(|s| s.1.iter().copied()))
            .max(capacity)
            .max(1.0)
            / mib
            * 1.1;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("master egress (MiB/s)")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, v)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts = v.iter().enumerate().map(|(t, b)| (t as f64 + 0.5, b / mib));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, capacity / mib), (xmax, capacity / mib)],
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label("master upload capacity")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.5)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    both(stem, &|r| draw(r, title, series, capacity), &|r| {
        draw(r, title, series, capacity)
    })
}

/// Per-node upload, in copies of the file, as a histogram.
pub fn upload_distribution(stem: &Path, title: &str, copies: &[f64]) -> Result<(), PlotError> {
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        copies: &[f64],
    ) -> Result<(), String> {
        let bins = 30usize;
        let top = max_of(copies.iter().copied()).max(1e-9) * 1.0001;
        let width = top / bins as f64;
        let mut counts = vec![0u32; bins];
        for c in copies {
            let i = ((c / width) as usize).min(bins - 1);
            counts[i] += 1;
        }
        let ymax = f64::from(counts.iter().copied().max().unwrap_or(1).max(1)) * 1.1;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..top, 0.0..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("uploaded (copies of the file)")
            .y_desc("nodes")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, c)| {
                let x0 = i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, f64::from(*c))], COLORS[0].filled())
            }))
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    both(stem, &|r| draw(r, title, copies), &|r| {
        draw(r, title, copies)
    })
}

/// A value against the varied key, one line per series (for sweeps): x labels are the
/// values as given, evenly spaced.
pub fn against_key(
    stem: &Path,
    title: &str,
    key: &str,
    y_desc: &str,
    xs: &[String],
    series: &[(String, Vec<f64>)],
    reference: Option<f64>,
) -> Result<(), PlotError> {
    #[allow(clippy::too_many_arguments)]
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        key: &str,
        y_desc: &str,
        xs: &[String],
        series: &[(String, Vec<f64>)],
        reference: Option<f64>,
    ) -> Result<(), String> {
        let n = xs.len().max(1);
        let ymax = max_of(series.iter().flat_map(|s| s.1.iter().copied()))
            .max(reference.unwrap_or(0.0))
            .max(1e-9)
            * 1.15;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..ymax)
            .map_err(|e| e.to_string())?;
        let labels = xs.to_vec();
        chart
            .configure_mesh()
            .x_desc(key)
            .y_desc(y_desc)
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, ys)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = ys
                .iter()
                .enumerate()
                .filter(|(_, y)| y.is_finite())
                .map(|(k, y)| (k as f64, *y))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        if let Some(r) = reference {
            chart
                .draw_series(LineSeries::new(
                    [(-0.5, r), (n as f64 - 0.5, r)],
                    BLACK.mix(0.5).stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    both(
        stem,
        &|r| draw(r, title, key, y_desc, xs, series, reference),
        &|r| draw(r, title, key, y_desc, xs, series, reference),
    )
}
