//! The import graph of each program's library: every `crate::…` path in a module file (in `use`
//! lines and inline alike, comments and string literals aside) is an edge to the module it
//! names. No cycle may appear, and the device plugin keeps its layers: configuration and names
//! at the bottom, the pure decisions above them only, the daemon on top.
//!
//! `cargo test -p nitrokey-e2e --test import_graph -- --nocapture` prints each graph by layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module name → the modules it refers to, each with the first line that does.
type Graph = BTreeMap<String, BTreeMap<String, usize>>;

/// The crate root's items (`lib.rs`: `crate::exit`, say) count as this node.
const ROOT: &str = "lib";

fn src_dir(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

/// `text` with comments, string and character literals blanked out (newlines kept, so line
/// numbers still hold): doc links and messages naming `crate::…` are no imports.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(chars[i..j.min(chars.len())].iter().map(|c| blank(*c)));
            i = j;
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(chars.len());
            out.extend(chars[i..end].iter().map(|c| blank(*c)));
            i = end;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), or else a lifetime.
            let end = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else {
                (chars.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            match end {
                Some(end) => {
                    out.extend(chars[i..=end].iter().map(|c| blank(*c)));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The first path segment after each `crate::` in `code`, with its line; for a group
/// (`crate::{a, b::c}`) each of the group's first segments.
fn crate_references(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].ends_with(|c: char| is_ident(c) || c == '$' || c == ':') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut items = vec![String::new()];
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(String::new()),
                    c if depth == 0 => items.last_mut().expect("an item").push(c),
                    _ => {}
                }
            }
            for item in items {
                let name: String = item
                    .trim_start()
                    .chars()
                    .take_while(|c| is_ident(*c))
                    .collect();
                if !name.is_empty() {
                    found.push((name, line));
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                found.push((name, line));
            }
        }
    }
    found
}

/// The import graph of a library crate's module files (`src/*.rs`, `src/*/mod.rs`; `main.rs`
/// is another crate and can import nothing of these).
fn graph(krate: &str) -> Graph {
    let dir = src_dir(krate);
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 file name")
            .to_owned();
        if path.is_dir() && path.join("mod.rs").is_file() {
            files.insert(name, path.join("mod.rs"));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "main" {
            files.insert(name, path);
        }
    }
    let mut graph = Graph::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).expect("module source");
        let edges = graph.entry(module.clone()).or_default();
        for (target, line) in crate_references(&code_only(&text)) {
            let target = if files.contains_key(&target) && target != ROOT {
                target
            } else {
                ROOT.to_owned()
            };
            if &target != module {
                edges.entry(target).or_insert(line);
            }
        }
    }
    graph
}

/// A cycle through the graph, as the modules along it (first = last), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    // Depth-first search, colouring modules on the current path.
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

/// Each module's layer: 0 imports nothing, n imports only layers below n.
fn layers(graph: &Graph) -> BTreeMap<String, usize> {
    let mut layer = BTreeMap::new();
    while layer.len() < graph.len() {
        let before = layer.len();
        for (module, edges) in graph {
            if layer.contains_key(module) {
                continue;
            }
            if let Some(below) = edges
                .keys()
                .map(|t| layer.get(t).copied())
                .collect::<Option<Vec<usize>>>()
            {
                let n = below.into_iter().max().map_or(0, |m| m + 1);
                layer.insert(module.clone(), n);
            }
        }
        assert!(layer.len() > before, "a cycle (find_cycle names it)");
    }
    layer
}

/// Fails naming the cycle and the line of each import along it; prints the graph by layer.
fn assert_acyclic(krate: &str) -> Graph {
    let graph = graph(krate);
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                format!(
                    "  {krate}/src/{}.rs:{} imports {}",
                    w[0], graph[&w[0]][&w[1]], w[1]
                )
            })
            .collect();
        panic!(
            "import cycle in {krate}: {}\n{}",
            cycle.join(" → "),
            steps.join("\n")
        );
    }
    let layer = layers(&graph);
    println!("{krate}, by layer (each imports only modules of lower layers):");
    for n in 0..=layer.values().copied().max().unwrap_or(0) {
        let here: Vec<String> = layer
            .iter()
            .filter(|(_, l)| **l == n)
            .map(|(m, _)| {
                let edges: Vec<&str> = graph[m].keys().map(String::as_str).collect();
                if edges.is_empty() {
                    m.clone()
                } else {
                    format!("{m} ({})", edges.join(", "))
                }
            })
            .collect();
        println!("  {n}: {}", here.join("; "));
    }
    graph
}

#[test]
fn device_plugin_has_no_import_cycle_and_keeps_its_layers() {
    let graph = assert_acyclic("device-plugin");
    let imports = |m: &str| -> Vec<&str> {
        graph
            .get(m)
            .unwrap_or_else(|| panic!("no module {m}"))
            .keys()
            .map(String::as_str)
            .collect()
    };
    // Configuration and names at the bottom: nothing but each other.
    let bottom = ["names", "text", "config"];
    for m in bottom {
        let wrong: Vec<&str> = imports(m)
            .into_iter()
            .filter(|t| !bottom.contains(t))
            .collect();
        assert!(
            wrong.is_empty(),
            "{m} sits at the bottom but imports {wrong:?}"
        );
    }
    // The pure decisions only above them, below every module doing I/O.
    let pure = ["inventory", "allocation", "replug"];
    for m in pure {
        let wrong: Vec<&str> = imports(m)
            .into_iter()
            .filter(|t| !bottom.contains(t) && !pure.contains(t))
            .collect();
        assert!(wrong.is_empty(), "{m} is pure but imports {wrong:?}");
    }
    // The daemon on top: nothing imports it.
    let users: Vec<&String> = graph
        .iter()
        .filter(|(_, edges)| edges.contains_key("daemon"))
        .map(|(m, _)| m)
        .collect();
    assert!(users.is_empty(), "daemon is on top but {users:?} import it");
}

#[test]
fn unseal_init_has_no_import_cycle() {
    assert_acyclic("unseal-init");
}

#[test]
fn common_has_no_import_cycle() {
    assert_acyclic("common");
}

#[test]
fn references_are_read_from_code_only() {
    let code = code_only(
        "//! See [`crate::a`].\nuse crate::{b, c::{D, E}, f as g};\n/* crate::h */ let s = \"crate::i\";\nlet r = r#\"crate::j\"#; let q = '\"'; crate::k::l();\nfn x<'a>(_: &'a str) { $crate::m; }\n",
    );
    let names: Vec<(String, usize)> = crate_references(&code);
    let names: Vec<(&str, usize)> = names.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    assert_eq!(names, [("b", 2), ("c", 2), ("f", 2), ("k", 4)]);
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a", "d"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(m, e)| {
        (
            m.to_owned(),
            e.into_iter().map(|t| (t.to_owned(), 1)).collect(),
        )
    })
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").expect("c").remove("a");
    assert_eq!(find_cycle(&acyclic), None);
    assert_eq!(layers(&acyclic)["a"], 3);
}
