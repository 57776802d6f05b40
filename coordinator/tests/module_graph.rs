//! The coordinator's module graphs stay acyclic (issue #12): the modules
//! of the driver (`coordinator/src/server/`), of the core
//! (`coordinator/src/core/`) and of the round machine
//! (`coordinator/src/round/`), each with the other modules of its folder
//! it names, read from the sources as text, must form graphs without
//! cycles.
//!
//! Print the graphs with
//! `cargo test -p fedlink-coordinator --test module_graph -- --nocapture`.
//!
//! What counts as naming a module: `super::x…` (resolved from the file's
//! own module; `super::super::…` too), `crate::<folder>::x…`, and `x::…` /
//! `self::x::…` in a file that has a child module `x`; a path resolves to
//! the longest prefix that is a module (`crate::server::engine::Event` →
//! `engine`; an item of the folder's `mod.rs` → `mod`), each item of a
//! group `super::{a::B, c}` alike. Comments (not a `//` inside a string),
//! `mod x;` declarations and each file's `#[cfg(test)] mod tests` are left
//! out. One thing a text reading cannot see: `impl Engine` blocks in the
//! child modules `engine/driver.rs` and `engine/round_files.rs` are called
//! through `self`, not through a path (one type's methods split by
//! concern), so those calls are no edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module of a folder, as its path below it (`[]` is `mod.rs`).
type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() {
        "mod".to_owned()
    } else {
        m.join("::")
    }
}

/// Every `.rs` file below `dir` with its module path and its text.
fn read_modules(dir: &Path, prefix: &Module, out: &mut Vec<(Module, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let file = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut sub = prefix.clone();
            sub.push(file);
            read_modules(&path, &sub, out);
        } else if let Some(stem) = file.strip_suffix(".rs") {
            let mut m = prefix.clone();
            if stem != "mod" {
                m.push(stem.to_owned());
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((m, text));
        }
    }
}

/// `text` without its comments (`//…` and `/*…*/`); string and character
/// literals are kept whole, so a `//` inside one (`"fedlink://…"`) cuts
/// nothing.
fn without_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied) = (0, 0);
    let keep = |out: &mut String, from: usize, to: usize| out.push_str(&text[from..to]);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                keep(&mut out, copied, i);
                i = text[i..].find('\n').map_or(b.len(), |n| i + n);
                copied = i;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                keep(&mut out, copied, i);
                i = text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                copied = i;
            }
            b'"' => {
                // Raw strings (`r"…"`, `r#"…"#`) end at the quote and as
                // many `#` as they started with; others at an unescaped quote.
                let hashes = text[..i].bytes().rev().take_while(|&c| c == b'#').count();
                let raw = text[..i - hashes].ends_with('r');
                i += 1;
                if raw {
                    let close = format!("\"{}", "#".repeat(hashes));
                    i = text[i..]
                        .find(&close)
                        .map_or(b.len(), |n| i + n + close.len());
                } else {
                    while i < b.len() && b[i] != b'"' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
            }
            // A character literal ('"', '\'', 'x'); a lifetime is one quote.
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            _ => i += 1,
        }
    }
    keep(&mut out, copied, b.len());
    out
}

/// The code of a file as the graph reads it: up to its unit tests, without
/// comments and `mod x;` lines.
fn code(text: &str) -> String {
    let mut end = text.len();
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]") {
        let after = text[from + at + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod tests") {
            end = from + at;
            break;
        }
        from += at + 1;
    }
    let mut out = String::new();
    for line in without_comments(&text[..end]).lines() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
        let t = t.strip_prefix("pub(super) ").unwrap_or(t);
        let t = t.strip_prefix("pub ").unwrap_or(t);
        let is_mod_decl = t
            .strip_prefix("mod ")
            .is_some_and(|r| r.trim_end().ends_with(';') && !r.contains('{'));
        if !is_mod_decl {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The leading identifier of `s`.
fn word(s: &str) -> &str {
    let end = s.find(|c: char| !is_word(c)).unwrap_or(s.len());
    &s[..end]
}

/// The modules `rest` (the text after `base::`) names: the longest module
/// prefix, for each item of a `{…}` group.
fn resolve(base: &Module, rest: &str, modules: &BTreeSet<Module>) -> BTreeSet<Module> {
    if let Some(group) = rest.strip_prefix('{') {
        let mut targets = BTreeSet::new();
        let (mut depth, mut item) = (0usize, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    targets.extend(resolve(base, item.trim(), modules));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        if !item.trim().is_empty() {
            targets.extend(resolve(base, item.trim(), modules));
        }
        return targets;
    }
    let mut cur = base.clone();
    for seg in rest.split("::") {
        let mut next = cur.clone();
        next.push(word(seg).to_owned());
        if modules.contains(&next) {
            cur = next;
        } else {
            break;
        }
    }
    BTreeSet::from([cur])
}

/// Module → the other modules of its folder it names; `root` is the
/// folder's path from the crate (`crate::server::`).
fn graph(files: &[(Module, String)], root: &str) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules: BTreeSet<Module> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut edges = BTreeMap::new();
    for (m, text) in files {
        let code = code(text);
        let children: BTreeSet<&str> = modules
            .iter()
            .filter(|c| c.len() == m.len() + 1 && c.starts_with(m))
            .filter_map(|c| c.last().map(String::as_str))
            .collect();
        let mut targets = BTreeSet::new();
        for (i, _) in code.char_indices() {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| is_word(c) || c == ':') {
                continue;
            }
            let here = &code[i..];
            if here.starts_with("super::") {
                let mut rest = here;
                let mut up = 0;
                while let Some(r) = rest.strip_prefix("super::") {
                    rest = r;
                    up += 1;
                }
                if up <= m.len() && rest.starts_with(|c: char| is_word(c) || c == '{') {
                    targets.extend(resolve(&m[..m.len() - up].to_vec(), rest, &modules));
                }
            } else if let Some(rest) = here.strip_prefix(root) {
                targets.extend(resolve(&Vec::new(), rest, &modules));
            } else {
                let rest = here.strip_prefix("self::").unwrap_or(here);
                let w = word(rest);
                if children.contains(w) && rest[w.len()..].starts_with("::") {
                    targets.extend(resolve(m, rest, &modules));
                }
            }
        }
        targets.remove(m);
        edges.insert(m.clone(), targets);
    }
    edges
}

/// A cycle of the graph, if it has one (its modules in order).
fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    // 0: not seen, 1: on the current path, 2: done.
    fn visit(
        v: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, u8>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        state.insert(v.clone(), 1);
        path.push(v.clone());
        for w in edges.get(v).into_iter().flatten() {
            match state.get(w).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|p| p == w).unwrap_or(0);
                    return Some(path[from..].to_vec());
                }
                0 => {
                    if let Some(c) = visit(w, edges, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(v.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in edges.keys() {
        if state.get(v).copied().unwrap_or(0) == 0
            && let Some(c) = visit(v, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn module(path: &str) -> Module {
    path.split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The folder's graph, printed, after checking it has no cycle.
fn acyclic_graph(folder: &str) -> BTreeMap<Module, BTreeSet<Module>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(folder);
    let mut files = Vec::new();
    read_modules(&dir, &Vec::new(), &mut files);
    let edges = graph(&files, &format!("crate::{folder}::"));
    println!("{folder}/:");
    for (m, targets) in &edges {
        let names: Vec<String> = targets.iter().map(name).collect();
        println!("  {} -> {}", name(m), names.join(", "));
    }
    let count: usize = edges.values().map(BTreeSet::len).sum();
    println!("  {} modules, {count} edges", edges.len());
    if let Some(cycle) = find_cycle(&edges) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!(
            "{folder}/ has an import cycle: {} -> (back to the first)",
            names.join(" -> ")
        );
    }
    edges
}

#[test]
fn the_server_modules_import_graph_is_acyclic() {
    let edges = acyclic_graph("server");
    let count: usize = edges.values().map(BTreeSet::len).sum();
    // The reading found the graph at all (a reader that finds nothing
    // would pass the cycle check): the driver names its events, and the
    // site session reaches the engine only through them.
    assert!(
        edges.len() >= 20 && count >= 50,
        "{} modules, {count} edges",
        edges.len()
    );
    assert!(edges[&module("engine::driver")].contains(&module("event")));
    assert!(edges[&module("site_session")].contains(&module("event")));
    assert!(!edges[&module("site_session")].contains(&module("engine")));
}

#[test]
fn the_core_and_round_import_graphs_are_acyclic() {
    let core = acyclic_graph("core");
    let count: usize = core.values().map(BTreeSet::len).sum();
    assert!(
        core.len() >= 20 && count >= 30,
        "{} modules, {count} edges",
        core.len()
    );
    // The parts speak the effects' vocabulary from its own module, which
    // the core's root re-exports (so the root and `sites` do not import
    // each other).
    assert!(core[&module("sites")].contains(&module("effect")));
    assert!(core[&module("")].contains(&module("sites")));
    let round = acyclic_graph("round");
    assert!(round.len() >= 3, "{} modules", round.len());
}

#[test]
fn the_reader_sees_each_kind_of_path_and_finds_a_cycle() {
    let files = vec![
        (
            module(""),
            // `mod x;` declarations are no edges; uses are.
            "mod a;\nmod b;\nmod c;\npub use a::Thing;\npub struct Shared;\n\
             fn x() { let _u = \"x://y\"; b::f(); self::c::h(); }\n"
                .to_owned(),
        ),
        (
            module("a"),
            // A group, a comment and a test module: only `b` counts.
            "use super::{b::Thing, Shared as _};\n// super::c::X\n\
             #[cfg(test)]\nmod tests { use super::super::c::Y; }\n"
                .to_owned(),
        ),
        (
            module("b"),
            "mod inner;\nfn f() { inner::g(); crate::server::c::h(); }\n".to_owned(),
        ),
        (
            module("b::inner"),
            "fn g() { super::super::a::k(); }\n".to_owned(),
        ),
        (
            module("c"),
            // A block comment names nothing; a group item its longest module prefix.
            "fn h() { /* super::a::z */ }\nuse super::{b::inner::G};\n".to_owned(),
        ),
    ];
    let edges = graph(&files, "crate::server::");
    let set = |xs: &[&str]| xs.iter().map(|x| module(x)).collect::<BTreeSet<_>>();
    assert_eq!(edges[&module("")], set(&["a", "b", "c"]));
    assert_eq!(edges[&module("a")], set(&["b", ""]));
    assert_eq!(edges[&module("b")], set(&["b::inner", "c"]));
    assert_eq!(edges[&module("b::inner")], set(&["a"]));
    assert_eq!(edges[&module("c")], set(&["b::inner"]));
    // What it reports is a cycle of the graph: mod -> a -> mod here.
    let is_cycle = |edges: &BTreeMap<Module, BTreeSet<Module>>, c: &[Module]| {
        !c.is_empty()
            && c.iter()
                .zip(c.iter().cycle().skip(1))
                .all(|(x, y)| edges.get(x).is_some_and(|t| t.contains(y)))
    };
    let cycle = find_cycle(&edges).unwrap_or_default();
    assert!(is_cycle(&edges, &cycle), "{cycle:?}");
    // Without mod.rs the one left runs through a child module.
    let rest = graph(&files[1..], "crate::server::");
    let cycle = find_cycle(&rest).unwrap_or_default();
    assert!(is_cycle(&rest, &cycle), "{cycle:?}");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    assert!(cycle.contains(&module("b::inner")), "{cycle:?}");

    let acyclic = graph(&files[..1], "crate::server::");
    assert_eq!(find_cycle(&acyclic), None);
}
