//! The figure of streaming perplexity (`ppl --cache --plot`, `eabfit plot` of stream JSONs):
//! the running NLL along the stream, one line per setting, StreamingLLM's picture. A cache
//! that loses its sink shows as a line that leaves the others where the cache first evicts.

use crate::plot::{font, write_atomic, DynError, FAMILY};
use crate::stream::StreamPpl;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Tokens averaged into each point of a line.
const SMOOTH: usize = 256;
/// Points drawn per line at most (a 20k-token stream needs no 20k-vertex path).
const MAX_POINTS: usize = 1000;
const SIZE: (u32, u32) = (1000, 560);
const COLORS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One setting: (token index, mean NLL of the `SMOOTH` tokens ending there) and where its
/// cache first evicts.
pub struct StreamLine {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub first_eviction: usize,
}

impl StreamLine {
    pub fn of(p: &StreamPpl, name: &str) -> Self {
        let label = format!("{name}, L {} S {}", p.cache, p.sink_tokens);
        Self {
            label,
            points: running_mean(&p.nll_per_token, SMOOTH, MAX_POINTS),
            first_eviction: p.cache,
        }
    }
}

/// Means of the windows of `w` values ending at evenly spaced indices (at most `n` of them),
/// keyed by the predicted token's index in the stream (nll[i] is token i + 1's).
fn running_mean(nll: &[f32], w: usize, n: usize) -> Vec<(f64, f64)> {
    let mut prefix = Vec::with_capacity(nll.len() + 1);
    prefix.push(0f64);
    for &x in nll {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + x as f64);
    }
    let step = nll.len().div_ceil(n).max(1);
    (1..=nll.len())
        .filter(|end| end % step == 0 || *end == nll.len())
        .map(|end| {
            let start = end.saturating_sub(w);
            let y = (prefix[end] - prefix[start]) / (end - start) as f64;
            (end as f64, y)
        })
        .filter(|p| p.1.is_finite())
        .collect()
}

/// Draws `lines` to `out` (.png, .svg, or both beside another name); returns warnings.
pub fn draw_stream(lines: &[StreamLine], title: &str, out: &Path) -> Result<Vec<String>> {
    if lines.iter().all(|l| l.points.is_empty()) {
        return Err(Error::file(out, "no finite NLL to plot"));
    }
    let (has_font, warnings) = font().clone();
    let (png, svg) = crate::plot::targets(out);
    if let Some(path) = png {
        write_atomic(&path, |tmp| {
            let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
            render(&root, lines, title, has_font)?;
            Ok(root.present()?)
        })?;
    }
    if let Some(path) = svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
            render(&root, lines, title, has_font).map_err(|e| Error::file(&path, e))?;
            root.present().map_err(|e| Error::file(&path, e))?;
        }
        write_atomic(&path, |tmp| Ok(std::fs::write(tmp, &text)?))?;
    }
    Ok(warnings)
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lines: &[StreamLine],
    title: &str,
    text: bool,
) -> std::result::Result<(), DynError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let all = lines.iter().flat_map(|l| l.points.iter());
    let (x_hi, y_lo, y_hi) = all.fold((1f64, f64::INFINITY, f64::NEG_INFINITY), |acc, p| {
        (acc.0.max(p.0), acc.1.min(p.1), acc.2.max(p.1))
    });
    let pad = ((y_hi - y_lo) * 0.05).max(0.05);
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption(
                format!("{title}: running NLL along the stream"),
                (FAMILY, 22),
            )
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0f64..x_hi, (y_lo - pad)..(y_hi + pad))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .light_line_style(RGBColor(240, 240, 240));
    if text {
        mesh.x_desc("token in the stream")
            .y_desc(format!("mean NLL of the last {SMOOTH} tokens"))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16));
    }
    mesh.draw()?;
    // Where each cache size first evicts: the lines of one L part there if at all.
    let mut evictions: Vec<usize> = lines.iter().map(|l| l.first_eviction).collect();
    evictions.sort_unstable();
    evictions.dedup();
    for x in evictions
        .into_iter()
        .map(|x| x as f64)
        .filter(|&x| x < x_hi)
    {
        chart.draw_series(DashedLineSeries::new(
            [(x, y_lo - pad), (x, y_hi + pad)],
            6,
            4,
            RGBColor(150, 150, 150).stroke_width(1),
        ))?;
    }
    for (i, l) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let series = chart.draw_series(LineSeries::new(
            l.points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if text {
            series.label(l.label.clone()).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::running_mean;

    #[test]
    fn running_mean_averages_the_window_ending_at_each_point() {
        let nll: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        let pts = running_mean(&nll, 4, 100);
        assert_eq!(pts.len(), 10);
        assert_eq!(pts[0], (1.0, 1.0));
        assert_eq!(pts[2], (3.0, 2.0));
        assert_eq!(pts[9], (10.0, 8.5));
        // Thinned to at most 3 points, the last one kept.
        let few = running_mean(&nll, 4, 3);
        assert_eq!(few.last(), Some(&(10.0, 8.5)));
        assert!(few.len() <= 4);
    }
}
