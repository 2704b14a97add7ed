//! Loading a recipe: text -> `serde_norway::Value` -> `a.b.c=value` overrides -> the typed
//! recipe -> its rules, every problem an [`Error::Usage`] naming the file, line and field path
//! with the nearest valid name.

use super::*;

/// A recipe type the loader below can read: typed by serde (unknown fields denied), with
/// defaults for every field it may leave out and rules serde cannot express. `train` reads
/// [`Recipe`], `pretrain` reads `crate::pretrain::recipe::PretrainRecipe`.
pub trait Typed: Serialize + DeserializeOwned {
    /// A value with every field present; its leaves are the paths overrides may set.
    fn skeleton() -> Self;
    /// Range and cross-field rules; the message starts with the dotted path at fault.
    fn check(&self) -> Result<(), String>;
}

impl Typed for Recipe {
    fn skeleton() -> Self {
        Recipe::new("", "", "")
    }
    fn check(&self) -> Result<(), String> {
        self.validate()
    }
}

/// Reads, overrides, types and validates a recipe file; see [`parse_str`].
pub fn load(path: &Path, overrides: &[String]) -> crate::Result<Recipe> {
    load_typed(path, overrides)
}

/// [`load`] for any [`Typed`] recipe.
pub fn load_typed<T: Typed>(path: &Path, overrides: &[String]) -> crate::Result<T> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("{origin}: cannot read recipe: {e}")))?;
    parse_typed(&text, &origin, overrides)
}

/// Parses recipe `text`, applies `overrides` (`dotted.path=value`, the value read as YAML),
/// types and validates it. `origin` names the text in errors, normally its file path.
pub fn parse_str(text: &str, origin: &str, overrides: &[String]) -> crate::Result<Recipe> {
    parse_typed(text, origin, overrides)
}

/// [`parse_str`] for any [`Typed`] recipe.
pub fn parse_typed<T: Typed>(text: &str, origin: &str, overrides: &[String]) -> crate::Result<T> {
    let usage = |at: Option<(usize, usize)>, msg: String| {
        Error::Usage(match at {
            Some((line, column)) => format!("{origin}:{line}:{column}: {msg}"),
            None => format!("{origin}: {msg}"),
        })
    };

    let mut value: Value = serde_norway::from_str(text).map_err(|e| match e.location() {
        // The location leads the message, so drop serde_norway's own copy of it.
        Some(l) => {
            let own = format!(" at line {} column {}", l.line(), l.column());
            usage(
                Some((l.line(), l.column())),
                e.to_string().replacen(&own, "", 1),
            )
        }
        None => usage(None, e.to_string()),
    })?;
    // An empty file should report the missing sections, not "expected struct Recipe".
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }

    let fields = leaf_paths::<T>();
    let mut set = Vec::new();
    for raw in overrides {
        let pair = parse_override(raw)
            .and_then(|pair| {
                set_paths(&mut value, std::slice::from_ref(&pair), &fields).map(|()| pair)
            })
            .map_err(|e| usage(None, format!("override `{}`: {e}", shown(raw))))?;
        set.push((raw, pair.0));
    }

    // A bad value that an override wrote is blamed on the override: its line in the file,
    // if any, holds a value that is no longer used.
    let report = |keys: &[String], msg: String| {
        let dotted = keys.join(".");
        let by_override = set.iter().find(|(_, path)| {
            dotted == *path
                || dotted
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        match by_override {
            Some((raw, _)) => usage(None, format!("override `{}`: {msg}", shown(raw))),
            None => usage(locate(text, keys), msg),
        }
    };

    let recipe: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        // Locating stops at the first list index: list items have no key to find.
        let mut keys: Vec<String> = e
            .path()
            .iter()
            .map_while(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let (msg, unknown_field) = explain(&e.inner().to_string());
        if let Some(name) = unknown_field {
            // The path ends at the unknown key, which the message already names: name the
            // mapping it sits in (only structs reached by keys have fields), point at the key.
            if keys.last() == Some(&name) {
                keys.pop();
            }
            path = keys.join(".");
            keys.push(name);
        }
        report(
            &keys,
            if path.is_empty() || path == "." {
                msg
            } else {
                format!("{path}: {msg}")
            },
        )
    })?;

    recipe.check().map_err(|msg| {
        let path = msg.split([' ', ':', '[']).next().unwrap_or_default();
        let keys: Vec<String> = path.split('.').map(String::from).collect();
        report(&keys, msg)
    })?;
    Ok(recipe)
}

/// An override as typed, with control characters escaped so the error stays one line.
fn shown(raw: &str) -> String {
    crate::error::escape_controls(raw)
}

fn parse_override(raw: &str) -> Result<(String, Value), String> {
    let (path, value) = raw.split_once('=').ok_or("expected `dotted.path=value`")?;
    let value = serde_norway::from_str(value).map_err(|e| format!("value is not YAML: {e}"))?;
    Ok((path.trim().to_string(), value))
}

/// Sets each dotted leaf path in a recipe tree, creating absent sections on the way.
/// Paths must be recipe fields (see [`field_paths`]), so a typo cannot slip in as a new key.
pub fn apply_overrides(value: &mut Value, overrides: &[(String, Value)]) -> Result<(), String> {
    set_paths(value, overrides, &field_paths())
}

/// [`apply_overrides`] against the leaf paths `fields` of some recipe type.
fn set_paths(
    value: &mut Value,
    overrides: &[(String, Value)],
    fields: &[String],
) -> Result<(), String> {
    for (path, new) in overrides {
        if !is_field_path(path, fields) {
            return Err(unknown_path(path, fields));
        }
        let keys: Vec<&str> = path.split('.').collect();
        let mut node = &mut *value;
        for (depth, key) in keys.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = node else {
                let parent = if depth == 0 {
                    "the recipe".into()
                } else {
                    keys[..depth].join(".")
                };
                return Err(format!("{parent} is not a mapping, cannot set `{path}`"));
            };
            node = map.entry(Value::from(*key)).or_insert(Value::Null);
        }
        *node = new.clone();
    }
    Ok(())
}

/// Whether an override may set `path`: a leaf of `fields`, or a path inside an optional
/// section (`data.long`, `verify.long`), which the skeleton holds as one null leaf. A misspelt
/// field inside such a section is left to the typed parse that follows (deny_unknown_fields),
/// which names it with its near miss.
pub fn is_field_path(path: &str, fields: &[String]) -> bool {
    fields.iter().any(|f| {
        f == path
            || path
                .strip_prefix(f.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Every dotted leaf path a recipe has, read off the default recipe so that it cannot
/// drift from the structs. Lists, nulls and empty maps (`ablate.grid`) are leaves.
pub fn field_paths() -> Vec<String> {
    leaf_paths::<Recipe>()
}

/// Every dotted leaf path of a [`Typed`] recipe, read off its skeleton.
pub fn leaf_paths<T: Typed>() -> Vec<String> {
    fn walk(value: &Value, prefix: String, out: &mut Vec<String>) {
        match value {
            Value::Mapping(map) if !map.is_empty() => {
                for (key, child) in map {
                    let key = key.as_str().expect("recipe keys are field names");
                    let path = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(child, path, out);
                }
            }
            _ => out.push(prefix),
        }
    }
    let defaults = serde_norway::to_value(T::skeleton()).expect("a recipe serializes");
    let mut paths = Vec::new();
    walk(&defaults, String::new(), &mut paths);
    paths
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant")
/// into "unknown field `x`; did you mean `a`?" when a name is close enough. Also returns
/// the unknown field's name, whose own line is the one to point at.
fn explain(msg: &str) -> (String, Option<String>) {
    let is_field = msg.starts_with("unknown field `");
    if !is_field && !msg.starts_with("unknown variant `") {
        return (msg.to_string(), None);
    }
    // serde backtick-quotes the offending name first, then every expected one.
    let quoted: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    let (unknown, expected) = quoted
        .split_first()
        .expect("the prefix holds one quoted name");
    let msg = match (
        near_miss(unknown, expected.iter().copied()),
        msg.split_once(", "),
    ) {
        (Some(best), Some((head, _))) => format!("{head}; did you mean `{best}`?"),
        _ => msg.to_string(),
    };
    (msg, is_field.then(|| unknown.to_string()))
}

/// "unknown recipe field" with the nearest valid path, if one is near.
pub(super) fn unknown_path(path: &str, fields: &[String]) -> String {
    match near_miss(path, fields.iter().map(String::as_str)) {
        Some(best) => format!(
            "unknown recipe field `{}`; did you mean `{best}`?",
            shown(path)
        ),
        None => format!("unknown recipe field `{}`", shown(path)),
    }
}

/// The closest candidate within rustc's typo budget (a third of the word's length).
pub(super) fn near_miss<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let budget = word.chars().count().max(3) / 3;
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= budget)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance with an adjacent swap counted as one edit, the commonest typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i chars of a and the first j of b.
    let mut d: Vec<Vec<usize>> = (0..=a.len()).map(|i| (i..=i + b.len()).collect()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = substitute.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// 1-based line and column of the key at `keys` in block-style YAML, found by indentation.
/// Flow mappings are not followed, so this falls back to the deepest key found.
fn locate(text: &str, keys: &[String]) -> Option<(usize, usize)> {
    let mut keys = keys.iter();
    let mut want = keys.next()?;
    let mut found = None;
    let mut parent_indent = None;
    // Indentation of the keys in the current block, taken from its first line.
    let mut block_indent = None;
    for (i, line) in text.lines().enumerate() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            break;
        }
        if indent != *block_indent.get_or_insert(indent) {
            continue;
        }
        let key = content
            .split_once(':')
            .filter(|(_, rest)| rest.is_empty() || rest.starts_with([' ', '\t']));
        if key.is_some_and(|(k, _)| k.trim().trim_matches(['"', '\'']) == want.as_str()) {
            found = Some((i + 1, indent + 1));
            parent_indent = Some(indent);
            block_indent = None;
            match keys.next() {
                Some(next) => want = next,
                None => break,
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::{edit_distance, near_miss};

    #[test]
    fn near_miss_counts_a_swap_as_one_edit() {
        assert_eq!(edit_distance("rnak", "rank"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(near_miss("lr", ["eps", "lr2"].into_iter()), Some("lr2"));
        assert_eq!(near_miss("xyz", ["eps"].into_iter()), None);
    }
}
