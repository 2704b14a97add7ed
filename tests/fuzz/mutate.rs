//! The mutators: seeded byte-level edits (bit flips, truncation, insertion, deletion,
//! duplication, extreme numbers written over any 4 or 8 bytes) and structural JSON / YAML edits
//! (keys removed or renamed, values swapped for junk of another type).

use rand::{rngs::StdRng, Rng};
use serde_json::{json, Value};

const EXTREME_U64: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX - 7,
    u64::MAX,
];

pub(crate) fn extreme_u64(rng: &mut StdRng) -> u64 {
    EXTREME_U64[rng.gen_range(0..EXTREME_U64.len())]
}

/// One random byte-level mutation inside `region` of `b`.
pub(crate) fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>, region: std::ops::Range<usize>) {
    let (lo, hi) = (region.start.min(b.len()), region.end.min(b.len()).max(1));
    let lo = lo.min(hi - 1);
    let at = |rng: &mut StdRng| rng.gen_range(lo..hi);
    match rng.gen_range(0..7) {
        0 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = at(rng);
                if i < b.len() {
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
            }
        }
        1 => b.truncate(at(rng)),
        2 => {
            let i = at(rng).min(b.len());
            let junk: Vec<u8> = (0..rng.gen_range(1..=16)).map(|_| rng.gen()).collect();
            b.splice(i..i, junk);
        }
        3 => {
            let i = at(rng).min(b.len());
            let j = (i + rng.gen_range(1..=32)).min(b.len());
            b.drain(i..j);
        }
        4 | 5 => {
            let width = if rng.gen_bool(0.5) { 8 } else { 4 };
            let i = at(rng);
            let v = extreme_u64(rng).to_le_bytes();
            for (k, &byte) in v.iter().enumerate().take(width) {
                if let Some(x) = b.get_mut(i + k) {
                    *x = byte;
                }
            }
        }
        _ => {
            let i = at(rng).min(b.len());
            let j = (i + rng.gen_range(1..=64)).min(b.len());
            let chunk = b[i..j].to_vec();
            b.splice(i..i, chunk);
        }
    }
}

fn junk_value(rng: &mut StdRng, was: &Value) -> Value {
    match rng.gen_range(0..16) {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(9007199254740993u64),
        7 => json!(0.5),
        8 => json!(extreme_u64(rng)),
        9 => Value::Null,
        10 => json!(true),
        11 => json!(""),
        12 => json!("x".repeat(rng.gen_range(1..5000))),
        13 => json!([was.clone()]),
        14 => json!({}),
        // A number written as a string and a string as a number: the common type swap.
        _ => match was {
            Value::Number(n) => json!(n.to_string()),
            Value::String(s) => s.parse::<f64>().map(|x| json!(x)).unwrap_or(json!(7)),
            _ => json!([]),
        },
    }
}

/// One structural mutation somewhere in `v`: a random walk picks the node.
pub(crate) fn mutate_json(rng: &mut StdRng, v: &mut Value) {
    let descend = rng.gen_bool(0.85);
    match v {
        Value::Object(map) if !map.is_empty() && descend => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.gen_range(0..keys.len())];
            match rng.gen_range(0..10) {
                0 => {
                    map.remove(k);
                }
                1 => {
                    let val = map.remove(k).unwrap_or(Value::Null);
                    map.insert(format!("{k}_"), val);
                }
                2 => {
                    map.insert("zz_unknown".into(), json!(1));
                }
                _ => mutate_json(rng, map.get_mut(k).unwrap()),
            }
        }
        Value::Array(a) if !a.is_empty() && descend => {
            let i = rng.gen_range(0..a.len());
            match rng.gen_range(0..8) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                }
                2 => a.clear(),
                _ => mutate_json(rng, &mut a[i]),
            }
        }
        other => *other = junk_value(rng, other),
    }
}

pub(crate) fn mutate_json_file(rng: &mut StdRng, text: &str) -> Vec<u8> {
    if rng.gen_bool(0.75) {
        let mut v: Value = serde_json::from_str(text).unwrap();
        for _ in 0..rng.gen_range(1..=3) {
            mutate_json(rng, &mut v);
        }
        serde_json::to_vec(&v).unwrap()
    } else {
        let mut b = text.as_bytes().to_vec();
        let n = b.len();
        mutate_bytes(rng, &mut b, 0..n);
        b
    }
}
