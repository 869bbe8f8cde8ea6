//! The shape of the code base, checked: the layers of ARCHITECTURE.md hold, no two files in `src/` import
//! each other (directly or through others), no file outgrows 600 lines (tests aside), and every name
//! ARCHITECTURE.md gives exists.
//!
//! Imports are read from the source text: `use` trees (groups expanded) and every `crate::…`, `super::…`
//! and `self::…` path, plus a parent's own references to the child modules it declares. A path is charged
//! to the file that defines the longest module prefix of it. Test modules (`#[cfg(test)] mod …` to the end
//! of a file) and `*_tests.rs` / `tests.rs` files are not part of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// Layers, bottom first. A module may import from its own layer and the ones below.
const LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["wire", "config"]),
    (
        "judgement and evidence",
        &[
            "classify",
            "audit",
            "token",
            "gate",
            "metrics",
            "check",
            "audit_tool",
        ],
    ),
    ("service", &["proxy", "devdb", "logging"]),
    ("commands", &["cli"]),
];

struct Source {
    module: Vec<String>,
    /// Text without its test module.
    text: String,
    lines: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn is_test_file(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    name.ends_with("_tests.rs")
        || name == "tests.rs"
        || p.components().any(|c| c.as_os_str() == "tests")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text before a trailing `#[cfg(test)] mod …` block.
fn without_tests(text: &str) -> &str {
    let mut at = 0;
    for (i, line) in text.lines().enumerate() {
        let _ = i;
        if line.trim() == "#[cfg(test)]" {
            let rest = &text[at + line.len()..];
            let next = rest
                .trim_start_matches(['\n', '\r'])
                .lines()
                .next()
                .unwrap_or("");
            if next.trim_start().starts_with("mod ") && !next.trim_end().ends_with(';') {
                return &text[..at];
            }
        }
        at += line.len() + 1;
    }
    text
}

fn sources() -> BTreeMap<PathBuf, Source> {
    let root = src_dir();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        if is_test_file(f.strip_prefix(&root).unwrap()) {
            continue;
        }
        let rel = f.strip_prefix(&root).unwrap();
        let mut module: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod" || m == "lib") {
            module.pop();
        }
        if module == ["main"] {
            module = vec!["main".into()];
        }
        let full = std::fs::read_to_string(&f).unwrap();
        let text = without_tests(&full).to_string();
        let lines = text.lines().count();
        out.insert(
            rel.to_path_buf(),
            Source {
                module,
                text,
                lines,
            },
        );
    }
    out
}

/// Removes comments and string literals (roughly: enough that paths in docs and messages do not count).
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // Raw strings r"…" / r#"…"# are rare here; treat the quote pair simply.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            i += 2;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`a::{b, c::{d}}`) into paths.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &base, out);
    } else if !tree.is_empty() {
        let item = tree.split(" as ").next().unwrap().trim();
        out.push(join(prefix, item));
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}::{b}"),
    }
}

/// Every path the code names, as written.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // use trees
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before_ok = at == 0 || !ident_char(rest[..at].chars().last().unwrap());
        let after = &rest[at + 4..];
        if before_ok {
            if let Some(end) = after.find(';') {
                expand(&after[..end], "", &mut out);
            }
        }
        rest = after;
    }
    // inline paths
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        if ident_char(c) && (i == 0 || !ident_char(chars[i - 1].1) && chars[i - 1].1 != ':') {
            let mut j = i;
            while j < chars.len() && (ident_char(chars[j].1) || chars[j].1 == ':') {
                j += 1;
            }
            let end = if j < chars.len() {
                chars[j].0
            } else {
                code.len()
            };
            let path = code[pos..end].trim_end_matches(':');
            if path.contains("::") {
                out.push(path.to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The module path a written path refers to, from module `here` (None: outside the crate).
fn absolute(here: &[String], path: &str, children: &BTreeSet<String>) -> Option<Vec<String>> {
    let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return None;
    }
    let mut base: Vec<String>;
    match parts[0] {
        "crate" => {
            base = Vec::new();
            parts.remove(0);
        }
        "stepgate" => {
            base = Vec::new();
            parts.remove(0);
        }
        "self" => {
            base = here.to_vec();
            parts.remove(0);
        }
        "super" => {
            base = here.to_vec();
            while parts.first() == Some(&"super") {
                base.pop();
                parts.remove(0);
            }
        }
        first if children.contains(first) => base = here.to_vec(),
        _ => return None,
    }
    base.extend(parts.iter().map(|s| s.to_string()));
    Some(base)
}

struct Graph {
    files: BTreeMap<PathBuf, Source>,
    edges: BTreeMap<PathBuf, BTreeSet<PathBuf>>,
}

fn graph() -> Graph {
    let files = sources();
    let by_module: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|(p, s)| (s.module.clone(), p.clone()))
        .collect();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (file, src) in &files {
        let code = code_only(&src.text);
        let children: BTreeSet<String> = code
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let l = l.strip_prefix("pub ").unwrap_or(l);
                let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
                l.strip_prefix("mod ")
                    .and_then(|r| r.strip_suffix(';'))
                    .map(str::to_string)
            })
            .collect();
        let is_main = src.module == ["main"];
        let here: Vec<String> = if is_main {
            Vec::new()
        } else {
            src.module.clone()
        };
        let entry = edges.entry(file.clone()).or_default();
        for p in paths(&code) {
            let Some(target) = absolute(&here, &p, &children) else {
                continue;
            };
            // Longest module prefix that is a file.
            let mut t = target.clone();
            loop {
                if let Some(f) = by_module.get(&t) {
                    if f != file && !t.is_empty() {
                        entry.insert(f.clone());
                    }
                    break;
                }
                if t.pop().is_none() {
                    break;
                }
            }
        }
    }
    Graph { files, edges }
}

fn layer_of(module: &[String]) -> Option<usize> {
    let top = module.first()?;
    LAYERS
        .iter()
        .position(|(_, mods)| mods.contains(&top.as_str()))
}

#[test]
fn no_file_is_longer_than_600_lines_tests_aside() {
    let long: Vec<String> = sources()
        .iter()
        .filter(|(_, s)| s.lines > MAX_LINES)
        .map(|(p, s)| format!("src/{} ({} lines)", p.display(), s.lines))
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:#?}");
}

#[test]
fn every_top_level_module_has_a_layer() {
    let g = graph();
    let mut missing = BTreeSet::new();
    for s in g.files.values() {
        if s.module.is_empty() || s.module == ["main"] {
            continue;
        }
        if layer_of(&s.module).is_none() {
            missing.insert(s.module[0].clone());
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a layer in tests/architecture.rs: {missing:?}"
    );
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let g = graph();
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        let Some(lf) = layer_of(&g.files[from].module) else {
            continue;
        };
        for to in tos {
            if let Some(lt) = layer_of(&g.files[to].module) {
                if lt > lf {
                    bad.push(format!(
                        "src/{} ({}) imports src/{} ({})",
                        from.display(),
                        LAYERS[lf].0,
                        to.display(),
                        LAYERS[lt].0
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "upward imports: {bad:#?}");
}

#[test]
fn no_two_files_import_each_other() {
    let g = graph();
    // Tarjan's strongly connected components.
    let nodes: Vec<&PathBuf> = g.files.keys().collect();
    let index_of: BTreeMap<&PathBuf, usize> =
        nodes.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|p| {
            g.edges
                .get(*p)
                .map(|s| s.iter().map(|t| index_of[t]).collect())
                .unwrap_or_default()
        })
        .collect();
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        sccs: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    visit(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.sccs.push(scc);
            }
        }
    }
    let n = nodes.len();
    let mut t = T {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        sccs: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(v, &adj, &mut t);
        }
    }
    let cycles: Vec<Vec<String>> = t
        .sccs
        .iter()
        .map(|c| {
            let mut names: Vec<String> = c
                .iter()
                .map(|&i| format!("src/{}", nodes[i].display()))
                .collect();
            names.sort();
            names
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "files that import each other: {cycles:#?}"
    );
}

#[test]
fn architecture_md_names_every_module_and_only_what_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the top of the repository");
    // Every top-level module and folder of src/ is named.
    let mut missing = Vec::new();
    for e in std::fs::read_dir(src_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("_tests.rs") || name == "lib.rs" || name == "main.rs" {
            continue;
        }
        let shown = if p.is_dir() {
            format!("`{name}/`")
        } else {
            format!("`{}`", name.trim_end_matches(".rs"))
        };
        if !doc.contains(&shown) {
            missing.push(shown);
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name {missing:?}"
    );
    // Every `src/…` path it gives exists.
    let mut gone = Vec::new();
    for (i, _) in doc.match_indices("`src/") {
        let rest = &doc[i + 1..];
        let end = rest.find('`').unwrap();
        let path = &rest[..end];
        if !root.join(path).exists() {
            gone.push(path.to_string());
        }
    }
    assert!(
        gone.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {gone:?}"
    );
}
