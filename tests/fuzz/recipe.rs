//! Recipes, mutated as YAML (values, keys, types) or as text (lines, bytes), and `key=value`
//! overrides of every recipe field with hostile keys and values.

use crate::mutate::{mutate_bytes, mutate_json};
use crate::{drive, quiet_backtraces, rng_for, scaled};
use rand::{rngs::StdRng, Rng};
use serde_json::Value;

pub(crate) const TINY_RECIPE: &str = include_str!("../../recipes/tiny-debug.yaml");

/// A recipe mutated as YAML (values, keys, types) or as text (lines, bytes).
pub(crate) fn mutate_recipe(rng: &mut StdRng) -> String {
    match rng.gen_range(0..4) {
        0 | 1 => {
            let mut v: Value = serde_norway::from_str(TINY_RECIPE).unwrap();
            for _ in 0..rng.gen_range(1..=3) {
                mutate_json(rng, &mut v);
            }
            serde_norway::to_string(&v).unwrap()
        }
        2 => {
            let mut lines: Vec<String> = TINY_RECIPE.lines().map(String::from).collect();
            for _ in 0..rng.gen_range(1..=3) {
                let i = rng.gen_range(0..lines.len());
                match rng.gen_range(0..5) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    2 => lines[i] = format!("  {}", lines[i]),
                    3 => lines[i] = lines[i].trim_start().to_string(),
                    _ => lines[i] = lines[i].replacen(':', "", 1),
                }
            }
            lines.join("\n")
        }
        _ => {
            let mut b = TINY_RECIPE.as_bytes().to_vec();
            let n = b.len();
            mutate_bytes(rng, &mut b, 0..n);
            String::from_utf8_lossy(&b).into_owned()
        }
    }
}

const OVERRIDE_VALUES: [&str; 34] = [
    "1",
    "-1",
    "0",
    "1e999",
    "-1e999",
    ".nan",
    ".inf",
    "-.inf",
    "18446744073709551616",
    "99999999999999999999999",
    "true",
    "null",
    "~",
    "[]",
    "{}",
    "[1, 2",
    "{a: 1}",
    "\"",
    "'",
    "*anchor",
    "&a b",
    "!!binary AAAA",
    "x\ny",
    "",
    "- 1",
    "[0, 1000000]",
    "[-1]",
    "kl",
    "all",
    "birth",
    "/nonexistent/x",
    "0.5",
    "2.5e-3",
    "[down, nope]",
];

pub(crate) fn mutate_overrides(rng: &mut StdRng, fields: &[String]) -> Vec<String> {
    (0..rng.gen_range(1..=3))
        .map(|_| {
            let mut key = fields[rng.gen_range(0..fields.len())].clone();
            match rng.gen_range(0..8) {
                0 => key.push('x'),
                1 => key = key.replacen('.', "..", 1),
                2 => key = format!("{key}.deeper"),
                3 => key = key.split('.').next().unwrap_or_default().to_string(),
                _ => {}
            }
            let value = if rng.gen_bool(0.1) {
                "a".repeat(rng.gen_range(1000..20000))
            } else {
                OVERRIDE_VALUES[rng.gen_range(0..OVERRIDE_VALUES.len())].to_string()
            };
            match rng.gen_range(0..12) {
                0 => key,
                1 => format!("={value}"),
                _ => format!("{key}={value}"),
            }
        })
        .collect()
}

#[test]
fn fuzz_recipes_and_overrides() {
    quiet_backtraces();
    eabfit::recipe::parse_str(TINY_RECIPE, "tiny.yaml", &[]).unwrap();
    drive("recipe", scaled(900), |i| {
        let mut rng = rng_for("recipe", i);
        let text = mutate_recipe(&mut rng);
        let origin = format!("fuzz-{i}.yaml");
        eabfit::recipe::parse_str(&text, &origin, &[])
            .map(|r| {
                // An accepted recipe must survive its own round trip (train writes it out).
                eabfit::recipe::parse_str(&r.to_yaml(), "resolved.yaml", &[]).unwrap();
            })
            .map_err(|e| (e.to_string(), origin))
    });
    let fields = eabfit::recipe::field_paths();
    drive("overrides", scaled(800), move |i| {
        let mut rng = rng_for("overrides", i);
        let ov = mutate_overrides(&mut rng, &fields);
        let origin = format!("fuzz-{i}.yaml");
        eabfit::recipe::parse_str(TINY_RECIPE, &origin, &ov)
            .map(|_| ())
            .map_err(|e| (e.to_string(), origin))
    });
}
