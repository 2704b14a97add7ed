//! The figure of `eabfit quant --plot`: per setting, quantized / float perplexity of the base
//! model and of the adapted one as bars on a log axis (1 = no loss from quantization).

use crate::plot::{font, write_atomic, DynError, FAMILY};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One setting's bars: quant_ppl / float_ppl of the base and (if any) of the adapted model.
pub struct GapBar {
    pub label: String,
    pub base: f64,
    pub adapted: Option<f64>,
}

const SIZE: (u32, u32) = (900, 500);
const BASE: RGBColor = RGBColor(214, 39, 40);
const EAB: RGBColor = RGBColor(31, 119, 180);

/// Draws `bars` to `out` (.png or .svg); returns warnings (no font: no text) that do not stop it.
pub fn draw_gaps(bars: &[GapBar], title: &str, out: &Path) -> Result<Vec<String>> {
    let finite = |b: &GapBar| b.base.is_finite() && b.adapted.is_none_or(f64::is_finite);
    if bars.is_empty() || !bars.iter().all(finite) {
        return Err(Error::file(out, "no finite perplexity ratios to plot"));
    }
    let (has_font, warnings) = font().clone();
    let svg = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
            render(&root, bars, title, has_font).map_err(|e| Error::file(out, e))?;
            root.present().map_err(|e| Error::file(out, e))?;
        }
        write_atomic(out, |tmp| Ok(std::fs::write(tmp, &text)?))?;
    } else {
        write_atomic(out, |tmp| {
            let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
            render(&root, bars, title, has_font)?;
            Ok(root.present()?)
        })?;
    }
    Ok(warnings)
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    bars: &[GapBar],
    title: &str,
    text: bool,
) -> std::result::Result<(), DynError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let ys = bars
        .iter()
        .flat_map(|b| std::iter::once(b.base).chain(b.adapted));
    let (lo, hi) = ys.fold((1f64, 1f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = (lo / 1.05, hi * 1.3);
    let n = bars.len();
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption(
                format!("{title}: quantized / float perplexity"),
                (FAMILY, 22),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(-0.5..n as f64 - 0.5, (lo..hi).log_scale())?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let x_label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    let y_label = |y: &f64| {
        if *y >= 10.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.2}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label);
    if text {
        mesh.label_style((FAMILY, 13))
            .y_desc("quant ppl / float ppl")
            .axis_desc_style((FAMILY, 15));
    }
    mesh.draw()?;
    let two = bars.iter().any(|b| b.adapted.is_some());
    let width = if two { 0.35 } else { 0.6 };
    for (i, b) in bars.iter().enumerate() {
        let x = i as f64;
        let left = if two { x - width } else { x - width / 2.0 };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(left, 1.0), (left + width, b.base)],
            BASE.filled(),
        )))?;
        if let Some(a) = b.adapted {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x, 1.0), (x + width, a)],
                EAB.filled(),
            )))?;
        }
    }
    if text {
        let style = TextStyle::from((FAMILY, 15).into_font());
        // Top left: the first settings (weights only, 8 bits) have the shortest bars.
        let x0 = 100;
        for (k, (name, color)) in [("base", BASE), ("eab", EAB)]
            .into_iter()
            .take(if two { 2 } else { 1 })
            .enumerate()
        {
            let y = 60 + 22 * k as i32;
            root.draw(&Rectangle::new(
                [(x0, y - 7), (x0 + 24, y + 7)],
                color.filled(),
            ))?;
            root.draw(&Text::new(name, (x0 + 32, y - 8), style.clone()))?;
        }
    }
    Ok(())
}
