//! Fig. 2 of "Massive Activations in LLMs" (Sun et al. 2024): per decoder layer, the top-1/2/3
//! and median |h| of the layer's output hidden state, on a log axis; several scans overlay.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{Error, Result};

/// One activation scan, indexed by layer.
pub struct LayerSeries {
    pub label: String,
    pub top: Vec<[f64; 3]>,
    pub median: Vec<f64>,
}

const SIZE: (u32, u32) = (1000, 600);
/// Log axes cannot show zero; a true zero lands here instead of vanishing from the line.
const FLOOR: f64 = 1e-6;
pub(crate) const FAMILY: &str = "sans-serif";
const STATS: [&str; 4] = ["top-1", "top-2", "top-3", "median"];
// Colour encodes the statistic, so a before/after overlay compares like with like.
const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
];

pub(crate) type DynError = Box<dyn std::error::Error>;

/// Draws the figure to `out`: `.png`, `.svg`, or, for any other extension, both beside it.
/// Returns warnings (no font found, values clamped) that do not stop the plot.
pub fn draw(series: &[LayerSeries], title: &str, out: &Path) -> Result<Vec<String>> {
    if series
        .iter()
        .all(|s| s.top.is_empty() && s.median.is_empty())
    {
        return Err(Error::file(out, "no layers to plot"));
    }
    let (has_font, mut warnings) = font().clone();
    warnings.extend(value_warnings(series));
    let (png, svg) = crate::plot::targets(out);
    if let Some(path) = png {
        let buf = render_rgb(series, title, SIZE, has_font).map_err(|e| Error::file(&path, e))?;
        write_atomic(&path, |tmp| {
            let mut backend = BitMapBackend::new(tmp, SIZE);
            backend.blit_bitmap((0, 0), SIZE, &buf)?;
            Ok(backend.present()?)
        })?;
    }
    if let Some(path) = svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
            render(&root, series, title, has_font).map_err(|e| Error::file(&path, e))?;
            root.present().map_err(|e| Error::file(&path, e))?;
        }
        write_atomic(&path, |tmp| Ok(std::fs::write(tmp, &text)?))?;
    }
    Ok(warnings)
}

/// Raw RGB pixels of the figure; kept apart from encoding so tests can inspect them.
fn render_rgb(
    series: &[LayerSeries],
    title: &str,
    size: (u32, u32),
    text: bool,
) -> std::result::Result<Vec<u8>, String> {
    let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        render(&root, series, title, text).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// `text == false` draws no glyph at all: with ab_glyph any text fails when no font is registered.
fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[LayerSeries],
    title: &str,
    text: bool,
) -> std::result::Result<(), DynError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.margin(8, 8, 8, 8);
    let entries: Vec<(usize, usize, String)> = series
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..4).map(move |k| {
                (
                    si,
                    k,
                    format!("{} {}", s.label, STATS[k]).trim().to_string(),
                )
            })
        })
        .collect();
    let label_style = TextStyle::from((FAMILY, 15).into_font());
    // The legend gets its own column so it never hides a line, whatever the data.
    let legend_w = if text {
        let widest = entries
            .iter()
            .map(|e| root.estimate_text_size(&e.2, &label_style))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        widest.iter().map(|&(w, _)| w).max().unwrap_or(0) + 60
    } else {
        0
    };
    let (plot, legend) = root.split_horizontally(root.dim_in_pixel().0.saturating_sub(legend_w));

    let points: Vec<[Vec<(f64, f64)>; 4]> = series
        .iter()
        .map(|s| std::array::from_fn(|k| stat_points(s, k)))
        .collect();
    let ys = points.iter().flatten().flatten().map(|p| p.1);
    let (lo, hi) = ys.fold((f64::INFINITY, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (1.0, 1.0) };
    // Whole decades, nudged outward: plotters rounds 10^-1 to just above 0.1 and drops that tick.
    let (lo, hi) = (
        10f64.powf((lo.log10() - 0.05).floor()) * (1.0 - 1e-9),
        10f64.powf((hi.log10() + 0.05).ceil()) * (1.0 + 1e-9),
    );
    let layers = series
        .iter()
        .map(|s| s.top.len().max(s.median.len()))
        .max()
        .unwrap_or(1)
        .max(1);

    let mut builder = ChartBuilder::on(&plot);
    builder.margin(10);
    if text {
        builder
            .caption(title, (FAMILY, 24))
            .x_label_area_size(45)
            .y_label_area_size(75);
    }
    let mut chart = builder.build_cartesian_2d(-0.5..layers as f64 - 0.5, (lo..hi).log_scale())?;
    let mut mesh = chart.configure_mesh();
    // At most one label per layer keeps the f64 key points on whole layers.
    mesh.x_labels(layers.min(16))
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{:.0}", x.round())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| fmt_mag(*y))
        .x_max_light_lines(1)
        .light_line_style(RGBColor(240, 240, 240));
    if text {
        mesh.x_desc("layer")
            .y_desc("magnitude (|h|)")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17));
    }
    mesh.draw()?;

    for (si, stats) in points.iter().enumerate() {
        for (k, pts) in stats.iter().enumerate() {
            let line = COLORS[k].stroke_width(2);
            if si % 2 == 0 {
                chart.draw_series(LineSeries::new(pts.iter().copied(), line))?;
            } else {
                chart.draw_series(DashedLineSeries::new(pts.iter().copied(), 9, 6, line))?;
            }
            chart.draw_series(pts.iter().map(|&p| marker(si, p, COLORS[k])))?;
        }
    }

    if text {
        let row = 24;
        for (i, (si, k, label)) in entries.iter().enumerate() {
            // A gap between scans groups each scan's four entries.
            let y = 60 + i as i32 * row + *si as i32 * row / 2;
            let line = COLORS[*k].stroke_width(2);
            if si % 2 == 0 {
                legend.draw(&PathElement::new(vec![(8, y), (44, y)], line))?;
            } else {
                legend.draw(&DashedPathElement::new(vec![(8, y), (44, y)], 9, 6, line))?;
            }
            legend.draw(&marker(*si, (26, y), COLORS[*k]))?;
            legend.draw(&Text::new(
                label.as_str(),
                (52, y),
                label_style.pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
    }
    Ok(())
}

/// Marker shape tells overlaid scans apart even where their lines coincide.
fn marker<DB: DrawingBackend, C: Clone + 'static>(
    series: usize,
    at: C,
    color: RGBColor,
) -> DynElement<'static, DB, C> {
    match series % 3 {
        0 => Circle::new(at, 4, color.filled()).into_dyn(),
        1 => TriangleMarker::new(at, 6, color.filled()).into_dyn(),
        _ => Cross::new(at, 5, color.stroke_width(2)).into_dyn(),
    }
}

/// Points for statistic `k` (0..3 top-k, 3 median); non-finite values are dropped, others floored.
fn stat_points(s: &LayerSeries, k: usize) -> Vec<(f64, f64)> {
    let ys: Vec<f64> = if k < 3 {
        s.top.iter().map(|t| t[k]).collect()
    } else {
        s.median.clone()
    };
    ys.into_iter()
        .enumerate()
        .filter(|(_, y)| y.is_finite())
        .map(|(i, y)| (i as f64, y.max(FLOOR)))
        .collect()
}

fn value_warnings(series: &[LayerSeries]) -> Vec<String> {
    let all = || {
        series
            .iter()
            .flat_map(|s| s.top.iter().flatten().chain(&s.median))
    };
    let (bad, small) = (
        all().filter(|y| !y.is_finite()).count(),
        all().filter(|y| y.is_finite() && **y < FLOOR).count(),
    );
    let mut w = Vec::new();
    if bad > 0 {
        w.push(format!("{bad} non-finite value(s) left out of the plot"));
    }
    if small > 0 {
        w.push(format!(
            "{small} value(s) below {FLOOR:e} drawn at {FLOOR:e} (log axis)"
        ));
    }
    w
}

fn fmt_mag(y: f64) -> String {
    if (1e-3..1e5).contains(&y) {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{y:.0e}")
    }
}

/// Registers a system font once per process; returns whether text can be drawn, and warnings.
pub(crate) fn font() -> &'static (bool, Vec<String>) {
    static FONT: OnceLock<(bool, Vec<String>)> = OnceLock::new();
    FONT.get_or_init(|| {
        let mut warnings = Vec::new();
        let env = std::env::var_os("EABFIT_FONT").map(PathBuf::from);
        for (i, path) in env.iter().cloned().chain(system_fonts()).enumerate() {
            let registered = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
                // plotters keeps fonts for the life of the process and asks for 'static bytes.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).map_err(|_| "not a usable TrueType font".to_string())
            });
            match registered {
                Ok(()) => return (true, warnings),
                Err(e) if i == 0 && env.is_some() => warnings.push(format!("EABFIT_FONT={}: {e}; trying system fonts", path.display())),
                Err(_) => {}
            }
        }
        warnings.push("no TrueType font found (set EABFIT_FONT=/path/to/font.ttf): plot drawn without title, labels or legend".into());
        (false, warnings)
    })
}

/// .ttf files under the usual font folders, DejaVuSans.ttf first, then plain sans faces.
fn system_fonts() -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for path in rd.flatten().map(|e| e.path()) {
            if path.is_dir() && depth < 8 {
                walk(&path, depth + 1, out);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
            {
                out.push(path);
            }
        }
    }
    let mut fonts = Vec::new();
    for dir in ["/usr/share/fonts", "/usr/local/share/fonts"] {
        walk(Path::new(dir), 0, &mut fonts);
    }
    fonts.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let plain_sans = name.contains("Sans")
            && !["Bold", "Italic", "Oblique", "Mono", "Light", "Condensed"]
                .iter()
                .any(|s| name.contains(s));
        (name != "DejaVuSans.ttf", !plain_sans, p.clone())
    });
    fonts
}

/// Writes through a temp file in the same folder, so a reader never sees half a figure.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), DynError>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file name"))?
        .to_string_lossy();
    // The PNG encoder picks its format from the extension, so the temp name keeps it.
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp.{ext}", std::process::id()));
    let result = write(&tmp)
        .map_err(|e| Error::file(path, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where a plot named `out` goes: `.png` or `.svg` as named, anything else as both beside it.
pub(crate) fn targets(out: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => (Some(out.to_path_buf()), None),
        Some("svg") => (None, Some(out.to_path_buf())),
        _ => (
            Some(out.with_extension("png")),
            Some(out.with_extension("svg")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like LLaMA-2-7B in the paper: massive activations appear after layer 3.
    fn demo(label: &str, scale: f64) -> LayerSeries {
        let top = (0..30)
            .map(|l| {
                if l <= 3 {
                    [2.0, 1.6, 1.3]
                } else {
                    [500.0 * scale, 420.0 * scale, 180.0 * scale]
                }
            })
            .collect();
        LayerSeries {
            label: label.into(),
            top,
            median: vec![0.3; 30],
        }
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    fn count_shapes(svg: &str) -> usize {
        svg.matches("<polyline").count() + svg.matches("<path").count()
    }

    #[test]
    fn png_and_svg_for_one_and_two_series() {
        let dir = tempfile::tempdir().unwrap();
        for series in [
            vec![demo("base", 1.0)],
            vec![demo("before", 1.0), demo("after", 0.02)],
        ] {
            let n = series.len();
            let png = dir.path().join(format!("s{n}.png"));
            let svg = dir.path().join(format!("s{n}.svg"));
            draw(&series, "test model", &png).unwrap();
            draw(&series, "test model", &svg).unwrap();
            assert_eq!(png_size(&std::fs::read(&png).unwrap()), SIZE);
            let text = std::fs::read_to_string(&svg).unwrap();
            assert!(text.contains("<svg"));
            assert!(
                count_shapes(&text) >= n * 4,
                "{} shapes",
                count_shapes(&text)
            );
        }
        // Other extensions write both formats; no temp file is left behind.
        draw(&[demo("x", 1.0)], "t", &dir.path().join("both.fig")).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["both.png", "both.svg", "s1.png", "s1.svg", "s2.png", "s2.svg"]
        );
    }

    #[test]
    fn pixels_show_every_statistic_with_and_without_text() {
        // Text only where a system font exists; the no-font path must draw all the same.
        for text in [font().0, false] {
            let buf = render_rgb(&[demo("a", 1.0), demo("b", 0.1)], "t", SIZE, text).unwrap();
            assert!(buf.chunks(3).any(|p| p != &buf[..3]), "blank image");
            for c in COLORS {
                assert!(
                    buf.chunks(3).any(|p| p == [c.0, c.1, c.2]),
                    "colour {c:?} missing (text={text})"
                );
            }
        }
    }

    #[test]
    fn odd_values_are_clamped_or_dropped_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let s = LayerSeries {
            label: String::new(),
            top: vec![[0.0, -1.0, f64::NAN], [5.0, 4.0, 3.0]],
            median: vec![0.0],
        };
        let w = draw(&[s], "t", &dir.path().join("odd.png")).unwrap();
        assert!(
            w.iter().any(|w| w.contains("non-finite")) && w.iter().any(|w| w.contains("below")),
            "{w:?}"
        );
        let empty = LayerSeries {
            label: "e".into(),
            top: vec![],
            median: vec![],
        };
        assert!(draw(&[empty], "t", &dir.path().join("e.png")).is_err());
        assert!(draw(&[demo("x", 1.0)], "t", &dir.path().join("missing/dir.png")).is_err());
    }

    /// Writes /tmp/plot-demo.png for a human to look at: `cargo test --release --lib plot -- --ignored`.
    #[test]
    #[ignore]
    fn demo_figure() {
        let w = draw(
            &[demo("", 1.0)],
            "Llama-2-7B",
            Path::new("/tmp/plot-demo.png"),
        )
        .unwrap();
        let w1 = draw(
            &[demo("before", 1.0), demo("after", 0.01)],
            "Llama-2-7B",
            Path::new("/tmp/plot-demo-overlay.png"),
        )
        .unwrap();
        eprintln!("warnings: {w:?} {w1:?}");
    }
}
