//! The crate's layout, checked on its source: no module imports one that imports it back,
//! directly or through others.
//!
//! The checker reads every file under src/ (not the binary's main.rs, a crate of its own), finds
//! the modules each one names (`use` trees and `crate::`/`super::`/child-module paths in code,
//! with comments and literals blanked out), follows re-exports (`pub use`) to the module that
//! defines a name, and draws an edge between the two siblings where the paths part: `model::mlp`
//! naming `model::config::Config` is `mlp -> config` inside `model`; `train` naming
//! `ops::adamw` is `train -> ops` at the top. A module and its own submodules may name each other
//! freely (that is ownership, not a cycle). Any cycle among siblings fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type ModPath = Vec<String>;

/// How a file's module path reads from its place under src/: `a/b.rs` and `a/b/mod.rs` are
/// `a::b`, lib.rs is the root; `None` for the binary's root.
fn module_of_file(rel: &str) -> Option<ModPath> {
    let rel = rel.strip_suffix(".rs")?;
    if rel == "main" || rel.starts_with("bin/") {
        return None;
    }
    let mut segs: ModPath = rel.split('/').map(String::from).collect();
    if matches!(segs.last().map(String::as_str), Some("mod" | "lib")) {
        segs.pop();
    }
    Some(segs)
}

/// The text with comments, string and char literals replaced by spaces (line breaks kept), so
/// that a path inside them is never read as an import.
fn blank_non_code(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if at(i) == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
                out.push(' ');
            }
        } else if at(i) == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if at(i) == 'r'
            && (at(i + 1) == '"' || at(i + 1) == '#')
            && !(i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // r"..." or r#"..."#: ends at a quote followed by as many hashes.
            let mut j = i + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|h| at(j + h) == '#')) {
                j += 1;
            }
            let end = (j + 1 + hashes).min(c.len());
            for &ch in &c[i..end] {
                blank(&mut out, ch);
            }
            i = end;
        } else if at(i) == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(c.len());
            for &ch in &c[i..end] {
                blank(&mut out, ch);
            }
            i = end;
        } else if at(i) == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a), which stays.
            let end = if at(i + 1) == '\\' {
                (i + 3..c.len()).find(|&k| c[k] == '\'').map(|k| k + 1)
            } else if at(i + 2) == '\'' {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for &ch in &c[i..end] {
                        blank(&mut out, ch);
                    }
                    i = end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn tokens(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut toks = vec![];
    let mut i = 0;
    while i < c.len() {
        if c[i].is_alphabetic() || c[i] == '_' {
            let s = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            toks.push(c[s..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            toks.push("::".into());
            i += 2;
        } else if c[i].is_whitespace() {
            i += 1;
        } else {
            toks.push(c[i].to_string());
            i += 1;
        }
    }
    toks
}

/// One `use` leaf: the path as written and the name it binds (`None` for a glob).
#[derive(Debug, Clone)]
struct UseLeaf {
    path: Vec<String>,
    name: Option<String>,
}

/// Parses a use tree from `t[*i]` up to (not past) its end; appends the leaves.
fn use_tree(t: &[String], i: &mut usize, prefix: Vec<String>, leaves: &mut Vec<UseLeaf>) {
    let mut path = prefix;
    loop {
        match t.get(*i).map(String::as_str) {
            Some("{") => {
                *i += 1;
                while t.get(*i).is_some_and(|s| s != "}") {
                    use_tree(t, i, path.clone(), leaves);
                    if t.get(*i).is_some_and(|s| s == ",") {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            Some("*") => {
                *i += 1;
                leaves.push(UseLeaf { path, name: None });
                return;
            }
            Some("::") => *i += 1,
            Some(s) if is_ident(s) => {
                if s == "self" && !path.is_empty() {
                    *i += 1;
                } else {
                    path.push(s.to_string());
                    *i += 1;
                }
                if t.get(*i).is_some_and(|s| s == "as") {
                    let alias = t.get(*i + 1).cloned();
                    *i += 2;
                    leaves.push(UseLeaf { path, name: alias });
                    return;
                }
                if t.get(*i).is_none_or(|s| s != "::") {
                    let name = path.last().cloned();
                    leaves.push(UseLeaf { path, name });
                    return;
                }
            }
            _ => return,
        }
    }
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// What one module (file or inline `mod x { }`) says: its `use` leaves and the paths in its code.
#[derive(Debug, Default)]
struct ModText {
    file: String,
    uses: Vec<UseLeaf>,
    paths: Vec<Vec<String>>,
}

/// Reads one file's modules: the file's own and each inline `mod name { .. }` inside it.
fn scan_file(file: &str, module: &ModPath, src: &str, mods: &mut BTreeMap<ModPath, ModText>) {
    let t = tokens(&blank_non_code(src));
    // (module path, brace depth at which it closes)
    let mut stack: Vec<(ModPath, usize)> = vec![(module.clone(), usize::MAX)];
    let mut depth = 0usize;
    let mut i = 0;
    let cur = |stack: &Vec<(ModPath, usize)>| stack.last().unwrap().0.clone();
    while i < t.len() {
        let tok = t[i].as_str();
        match tok {
            "{" => {
                depth += 1;
                i += 1;
            }
            "}" => {
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            "mod" if t.get(i + 2).is_some_and(|s| s == "{") && is_ident(&t[i + 1]) => {
                let mut m = cur(&stack);
                m.push(t[i + 1].clone());
                mods.entry(m.clone()).or_default().file = file.to_string();
                depth += 1;
                stack.push((m, depth));
                i += 3;
            }
            "use" => {
                i += 1;
                let mut leaves = vec![];
                use_tree(&t, &mut i, vec![], &mut leaves);
                mods.entry(cur(&stack)).or_default().uses.extend(leaves);
            }
            _ if is_ident(tok) && t.get(i + 1).is_some_and(|s| s == "::") => {
                let preceded = i > 0 && t[i - 1] == "::";
                let mut path = vec![tok.to_string()];
                let mut j = i + 1;
                while t.get(j).is_some_and(|s| s == "::")
                    && t.get(j + 1).is_some_and(|s| is_ident(s))
                {
                    path.push(t[j + 1].clone());
                    j += 2;
                }
                if !preceded {
                    mods.entry(cur(&stack)).or_default().paths.push(path);
                }
                i = j;
            }
            _ => i += 1,
        }
    }
}

/// The module graph of a crate given as (path under src/, text) pairs.
struct Crate {
    mods: BTreeMap<ModPath, ModText>,
}

impl Crate {
    fn new<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut mods = BTreeMap::new();
        for (rel, src) in files {
            if let Some(m) = module_of_file(rel) {
                mods.entry(m.clone()).or_insert_with(ModText::default).file = rel.to_string();
                scan_file(rel, &m, src, &mut mods);
            }
        }
        Crate { mods }
    }

    fn is_module(&self, m: &[String]) -> bool {
        self.mods.contains_key(m)
    }

    /// `path` written inside module `at`, made absolute; `None` when it leaves the crate or
    /// names something local (a variable, a type's associated item).
    fn absolute(&self, at: &ModPath, path: &[String], hops: usize) -> Option<ModPath> {
        let (first, rest) = path.split_first()?;
        let mut base = match first.as_str() {
            "crate" => vec![],
            "self" => at.clone(),
            "super" => {
                let mut b = at.clone();
                b.pop()?;
                let mut rest = rest;
                while rest.first().is_some_and(|s| s == "super") {
                    b.pop()?;
                    rest = &rest[1..];
                }
                b.extend(rest.iter().cloned());
                return Some(b);
            }
            name => {
                let mut child = at.clone();
                child.push(name.to_string());
                if self.is_module(&child) {
                    child
                } else {
                    let leaf = self.binding(at, name)?;
                    if hops > 16 {
                        return None;
                    }
                    self.absolute(at, &leaf.path, hops + 1)?
                }
            }
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The `use` leaf of module `at` that binds `name`.
    fn binding(&self, at: &ModPath, name: &str) -> Option<&UseLeaf> {
        self.mods
            .get(at)?
            .uses
            .iter()
            .find(|u| u.name.as_deref() == Some(name))
    }

    /// The module that defines what the absolute `path` names, through re-exports.
    fn defining_module(&self, path: &[String], hops: usize) -> ModPath {
        let mut cur: ModPath = vec![];
        for (k, seg) in path.iter().enumerate() {
            let mut child = cur.clone();
            child.push(seg.clone());
            if self.is_module(&child) {
                cur = child;
                continue;
            }
            if hops < 16 {
                if let Some(leaf) = self.binding(&cur, seg) {
                    if let Some(mut target) = self.absolute(&cur, &leaf.path, 0) {
                        target.extend(path[k + 1..].iter().cloned());
                        return self.defining_module(&target, hops + 1);
                    }
                }
            }
            break;
        }
        cur
    }

    /// Sibling edges (from, to) with one place each that makes it (file: path as written).
    fn edges(&self) -> BTreeMap<(ModPath, ModPath), String> {
        let mut edges = BTreeMap::new();
        for (m, text) in &self.mods {
            let written = text.uses.iter().map(|u| &u.path).chain(&text.paths);
            for path in written {
                let Some(abs) = self.absolute(m, path, 0) else {
                    continue;
                };
                let to = self.defining_module(&abs, 0);
                let c = m.iter().zip(&to).take_while(|(a, b)| a == b).count();
                if c < m.len() && c < to.len() {
                    edges
                        .entry((m[..=c].to_vec(), to[..=c].to_vec()))
                        .or_insert_with(|| format!("{}: {}", text.file, path.join("::")));
                }
            }
        }
        edges
    }
}

/// A cycle of the graph, as its modules in order (the first repeated at the end), if any.
fn find_cycle(edges: &BTreeMap<(ModPath, ModPath), String>) -> Option<Vec<ModPath>> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
    }
    // 0 unvisited, 1 on the current path, 2 done.
    let mut state: BTreeMap<&ModPath, u8> = BTreeMap::new();
    fn visit<'a>(
        v: &'a ModPath,
        next: &BTreeMap<&'a ModPath, Vec<&'a ModPath>>,
        state: &mut BTreeMap<&'a ModPath, u8>,
        path: &mut Vec<&'a ModPath>,
    ) -> Option<Vec<ModPath>> {
        state.insert(v, 1);
        path.push(v);
        for &w in next.get(v).map(Vec::as_slice).unwrap_or(&[]) {
            match state.get(w).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|p| *p == w).unwrap();
                    let mut cycle: Vec<ModPath> =
                        path[from..].iter().map(|p| (*p).clone()).collect();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(w, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(v, 2);
        None
    }
    let starts: Vec<&ModPath> = next.keys().copied().collect();
    for v in starts {
        if state.get(v).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, &next, &mut state, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

fn name(m: &ModPath) -> String {
    m.join("::")
}

/// The cycle spelled out, each step with a place that makes it.
fn describe(cycle: &[ModPath], edges: &BTreeMap<(ModPath, ModPath), String>) -> String {
    cycle
        .windows(2)
        .map(|w| {
            let why = &edges[&(w[0].clone(), w[1].clone())];
            format!("  {} -> {}   ({why})", name(&w[0]), name(&w[1]))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            read_tree(root, &p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&p).unwrap();
            out.push((rel, text));
        }
    }
}

fn edge_names(edges: &BTreeMap<(ModPath, ModPath), String>) -> BTreeSet<(String, String)> {
    edges.keys().map(|(a, b)| (name(a), name(b))).collect()
}

#[test]
fn src_has_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    read_tree(&root, &root, &mut files);
    let krate = Crate::new(files.iter().map(|(p, s)| (p.as_str(), s.as_str())));
    let edges = krate.edges();
    // The reader must see the crate's real imports, or an empty graph would pass vacuously.
    let names = edge_names(&edges);
    for (a, b) in [
        ("adapters", "model"),
        ("model", "ops"),
        ("checkpoint", "model"),
        ("train", "loss"),
        ("model::block", "model::attention"),
        ("model::attention", "model::config"),
    ] {
        assert!(
            names.contains(&(a.to_string(), b.to_string())),
            "the checker does not see {a} -> {b}; it read {} edges",
            names.len()
        );
    }
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle in src/:\n{}", describe(&cycle, &edges));
    }
}

#[test]
fn the_checker_finds_a_planted_cycle() {
    // a -> b -> c -> a, the last step through a re-export at the root and the middle one in
    // code, not in a `use`; inside `d`, x and y name each other through d's re-export.
    let files = [
        (
            "lib.rs",
            "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub use a::Thing;\n",
        ),
        ("a.rs", "use crate::b::{self, B};\npub struct Thing;\n"),
        ("b.rs", "pub struct B;\nfn f() { crate::c::g(); }\n"),
        ("c.rs", "use super::Thing;\npub fn g() {}\n"),
        (
            "d/mod.rs",
            "mod x;\nmod y;\npub use y::Y;\npub(crate) type R = u8;\n",
        ),
        ("d/x.rs", "use super::{R, Y};\npub struct X;\n"),
        ("d/y.rs", "pub struct Y(crate::d::x::X);\n"),
    ];
    let edges = Crate::new(files).edges();
    let cycle = find_cycle(&edges).expect("the planted cycle was not found");
    let found: BTreeSet<String> = cycle.iter().map(name).collect();
    let top: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let inner: BTreeSet<String> = ["d::x", "d::y"].map(String::from).into();
    assert!(found == top || found == inner, "odd cycle {found:?}");
    let names = edge_names(&edges);
    for (a, b) in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("d::x", "d::y"),
        ("d::y", "d::x"),
    ] {
        assert!(
            names.contains(&(a.into(), b.into())),
            "missing {a} -> {b} in {names:?}"
        );
    }
    // A module and its parent naming each other (d::x uses d's R) is no edge.
    assert!(
        !names.iter().any(|(a, b)| a == "d" || b == "d"),
        "{names:?}"
    );

    // The same crate with each back edge only in a comment, a string or a char: no cycle.
    let files = [
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::b::B;\npub struct Thing;\n"),
        ("b.rs", "pub struct B;\nfn f() { crate::c::g(); }\n"),
        (
            "c.rs",
            "// use crate::a::Thing;\n/* crate::a::Thing /* nested */ crate::a */\n\
             pub fn g() { let _ = (\"crate::a::Thing\", r#\"crate::a\"#, '\"'); }\n\
             fn h<'x>(s: &'x str) -> &'x str { s }\n",
        ),
    ];
    let edges = Crate::new(files).edges();
    assert_eq!(
        edge_names(&edges),
        [("a", "b"), ("b", "c")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .into()
    );
    assert!(find_cycle(&edges).is_none());
}
