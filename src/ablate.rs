//! `eabfit ablate`: the recipe's `ablate:` grid (cross product) and/or explicit points, each
//! run as its own training run under one TensorBoard folder, then verified, then summarised
//! in one table (markdown + CSV). A failed point is reported and the grid goes on.

use crate::fsio::write_atomic;
use crate::recipe::{self, Recipe};
use crate::train::{train, Summary};
use crate::verify::{verify, VerifyPlan};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_norway::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One grid point: overrides in a stable order, and the run name they make.
#[derive(Debug, Clone)]
pub struct Point {
    pub overrides: Vec<(String, Value)>,
    pub name: String,
}

fn flow(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Sequence(xs) => format!("[{}]", xs.iter().map(flow).collect::<Vec<_>>().join(",")),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Grid cross product first (keys in sorted order), then the explicit points.
pub fn points(r: &Recipe) -> Vec<Point> {
    let mut sets: Vec<Vec<(String, Value)>> = vec![vec![]];
    for (key, values) in &r.ablate.grid {
        sets = sets
            .into_iter()
            .flat_map(|s| {
                values
                    .iter()
                    .map(move |v| [s.clone(), vec![(key.clone(), v.clone())]].concat())
            })
            .collect();
    }
    if r.ablate.grid.is_empty() {
        sets.clear();
    }
    sets.extend(
        r.ablate
            .points
            .iter()
            .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    );
    sets.into_iter()
        .map(|overrides| {
            let name = overrides
                .iter()
                .map(|(k, v)| format!("{k}={}", flow(v)))
                .collect::<Vec<_>>()
                .join(",")
                .replace(['/', ' '], "_");
            Point {
                name: if name.is_empty() { "base".into() } else { name },
                overrides,
            }
        })
        .collect()
}

/// The recipe of one point: the grid's recipe with the point's overrides, its own out_dir
/// under the grid's, and its run name under the shared TensorBoard folder.
fn point_recipe(r: &Recipe, p: &Point, origin: &str) -> Result<Recipe> {
    let mut value =
        serde_norway::to_value(r).map_err(|e| Error::Usage(format!("{origin}: {e}")))?;
    let mut ov = p.overrides.clone();
    ov.push((
        "train.out_dir".into(),
        Value::String(r.train.out_dir.join(&p.name).display().to_string()),
    ));
    ov.push(("log.name".into(), Value::String(p.name.clone())));
    recipe::apply_overrides(&mut value, &ov)
        .map_err(|e| Error::Usage(format!("{origin}: point `{}`: {e}", p.name)))?;
    if let Value::Mapping(m) = &mut value {
        m.remove("ablate");
    }
    let text =
        serde_norway::to_string(&value).map_err(|e| Error::Usage(format!("{origin}: {e}")))?;
    recipe::parse_str(&text, &format!("{origin} (point {})", p.name), &[])
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub point: String,
    pub status: String,
    pub loss: Option<f64>,
    pub hold: Option<f64>,
    pub ma: Option<f64>,
    pub massive_count: Option<usize>,
    pub worst_layer: Option<usize>,
    pub worst_top1: Option<f64>,
    pub ppl_base: Option<f64>,
    pub ppl_after: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: Option<f64>,
    pub verify: Option<bool>,
    /// The adapted model's quantized / float perplexity - 1, when the recipe sets
    /// verify.quant.max_gap.
    #[serde(default)]
    pub quant_gap: Option<f64>,
}

impl Row {
    fn failed(point: &str, e: &Error) -> Self {
        Row {
            point: point.into(),
            status: format!("failed: {e}"),
            loss: None,
            hold: None,
            ma: None,
            massive_count: None,
            worst_layer: None,
            worst_top1: None,
            ppl_base: None,
            ppl_after: None,
            tokens_per_s: None,
            wall_s: None,
            verify: None,
            quant_gap: None,
        }
    }
}

/// Trains and verifies one point; its figures are those of the adapters verify checks (`best/`).
fn run_point(r: &Recipe) -> Result<(Summary, bool, f64, Option<f64>)> {
    let (_, summary) = train(r, None)?;
    // train writes into r.train.out_dir, which is where the recipe's plan looks.
    let plan = VerifyPlan::from_recipe(r);
    let report = verify(&plan)?;
    let gap = report.quant.as_ref().map(|q| q.gap);
    Ok((summary, report.pass, report.adapted.ppl, gap))
}

fn row_of(point: &str, s: &Summary, pass: bool, ppl_after: f64, quant_gap: Option<f64>) -> Row {
    let (worst_layer, worst_top1) = s.best.top1.iter().enumerate().fold(
        (0, 0f64),
        |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
    );
    Row {
        point: point.into(),
        status: "done".into(),
        loss: s.final_losses.get("loss").copied(),
        hold: s.final_losses.get("hold").copied(),
        ma: s.final_losses.get("ma").copied(),
        massive_count: Some(s.best.massive_count),
        worst_layer: Some(worst_layer),
        worst_top1: Some(worst_top1),
        ppl_base: Some(s.base.ppl),
        ppl_after: Some(ppl_after),
        tokens_per_s: Some(s.tokens_per_s),
        wall_s: Some(s.wall_s),
        verify: Some(pass),
        quant_gap,
    }
}

const HEADER: [&str; 14] = [
    "point",
    "status",
    "loss",
    "hold",
    "ma",
    "massive_count",
    "worst_layer",
    "worst_top1",
    "ppl_base",
    "ppl_after",
    "tokens_per_s",
    "wall_s",
    "verify",
    "quant_gap",
];

fn cells(r: &Row) -> Vec<String> {
    let f = |x: Option<f64>, p: usize| x.map_or("-".into(), |v| format!("{v:.p$}"));
    vec![
        r.point.clone(),
        r.status.clone(),
        f(r.loss, 5),
        f(r.hold, 5),
        f(r.ma, 4),
        r.massive_count.map_or("-".into(), |v| v.to_string()),
        r.worst_layer.map_or("-".into(), |v| v.to_string()),
        f(r.worst_top1, 1),
        f(r.ppl_base, 3),
        f(r.ppl_after, 3),
        f(r.tokens_per_s, 0),
        f(r.wall_s, 1),
        r.verify.map_or(
            "-".into(),
            |v| if v { "pass".into() } else { "fail".into() },
        ),
        f(r.quant_gap, 4),
    ]
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = format!(
        "| {} |\n|{}|\n",
        HEADER.join(" | "),
        vec!["---"; HEADER.len()].join("|")
    );
    for r in rows {
        s += &format!("| {} |\n", cells(r).join(" | ").replace('\n', " "));
    }
    s
}

pub fn csv(rows: &[Row]) -> String {
    let quote = |c: String| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c
        }
    };
    let mut s = HEADER.join(",") + "\n";
    for r in rows {
        s += &(cells(r)
            .into_iter()
            .map(quote)
            .collect::<Vec<_>>()
            .join(",")
            + "\n");
    }
    s
}

/// Runs every point (skipping finished ones with `resume`); returns the table rows.
pub fn ablate(r: &Recipe, origin: &str, resume: bool) -> Result<(PathBuf, Vec<Row>)> {
    let pts = points(r);
    if pts.is_empty() {
        return Err(Error::Usage(format!(
            "{origin}: ablate: no grid and no points"
        )));
    }
    let recipes: Vec<Recipe> = pts
        .iter()
        .map(|p| point_recipe(r, p, origin))
        .collect::<Result<_>>()?;
    let out = r.train.out_dir.clone();
    let state_path = out.join("ablate.json");
    let mut done: BTreeMap<String, Row> = match (resume, std::fs::read_to_string(&state_path)) {
        (true, Ok(text)) => serde_json::from_str::<Vec<Row>>(&text)
            .map_err(|e| Error::file(&state_path, e))?
            .into_iter()
            .filter(|row| row.status == "done")
            .map(|row| (row.point.clone(), row))
            .collect(),
        _ => BTreeMap::new(),
    };
    let mut rows = vec![];
    for (i, (p, pr)) in pts.iter().zip(&recipes).enumerate() {
        if let Some(row) = done.remove(&p.name) {
            eprintln!("[{}/{}] {}: done before, skipped", i + 1, pts.len(), p.name);
            rows.push(row);
            continue;
        }
        eprintln!("[{}/{}] {}", i + 1, pts.len(), p.name);
        let row = match run_point(pr) {
            Ok((s, pass, ppl, gap)) => row_of(&p.name, &s, pass, ppl, gap),
            Err(e) => {
                eprintln!("point {} failed: {e}", p.name);
                Row::failed(&p.name, &e)
            }
        };
        rows.push(row);
        save(&out, &rows)?;
    }
    save(&out, &rows)?;
    Ok((out, rows))
}

fn save(out: &Path, rows: &[Row]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows).map_err(|e| Error::file(out, e))?;
    write_atomic(&out.join("ablate.json"), json.as_bytes())?;
    write_atomic(&out.join("ablate.md"), markdown(rows).as_bytes())?;
    write_atomic(&out.join("ablate.csv"), csv(rows).as_bytes())
}
