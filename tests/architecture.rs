//! The layering the README states, checked on the sources: crates depend only downwards
//! (http → fal schema → engine → models → core), and no crate's modules form a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates")
}

/// Each crate's layer: a crate may depend on crates of lower layers only.
const LAYERS: [(&str, u32); 10] = [
    ("pixart-core", 0),
    ("pixart-t5", 1),
    ("pixart-dit", 1),
    ("pixart-vae", 1),
    ("pixart-scheduler", 1),
    ("pixart-safety", 1),
    ("pixart-pipeline", 2),
    ("pixart-fal", 3),
    ("pixart-server", 4),
    ("pixart-cli", 5),
];

/// The `pixart-*` crates a manifest's `[dependencies]` (any target) name.
fn dependencies(manifest: &str) -> BTreeSet<String> {
    let mut in_dependencies = false;
    let mut found = BTreeSet::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_dependencies = line.ends_with("dependencies]") && !line.contains("dev-dependencies");
            continue;
        }
        if in_dependencies {
            if let Some(name) = line.split(['=', '.', ' ']).next().filter(|n| n.starts_with("pixart-")) {
                found.insert(name.to_string());
            }
        }
    }
    found
}

#[test]
fn crates_depend_only_downwards() {
    let layer: BTreeMap<&str, u32> = LAYERS.into_iter().collect();
    let mut seen = 0;
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let own = *layer.get(name.as_str()).unwrap_or_else(|| panic!("{name} has no layer here"));
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        for dependency in dependencies(&manifest) {
            let theirs = layer[dependency.as_str()];
            assert!(theirs < own, "{name} (layer {own}) depends on {dependency} (layer {theirs})");
        }
        seen += 1;
    }
    assert_eq!(seen, LAYERS.len());
}

/// A source file's module path inside its crate (`core::queue`; the root is empty).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("lib" | "main" | "mod")) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules each module of a crate uses (`crate::x` and `super::x` in code, not comments, not
/// test modules).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut uses = BTreeSet::new();
        for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            for (prefix, base) in [("crate::", Vec::new()), ("super::", module.split("::").map(String::from).collect())]
            {
                for rest in line.split(prefix).skip(1) {
                    let path: Vec<&str> = rest
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                        .next()
                        .unwrap_or("")
                        .split("::")
                        .collect();
                    let mut base = base.clone();
                    base.pop();
                    // The longest prefix of the path that is a module.
                    for k in (1..=path.len()).rev() {
                        let candidate = base
                            .iter()
                            .map(String::as_str)
                            .chain(path[..k].iter().copied())
                            .collect::<Vec<_>>()
                            .join("::");
                        if modules.contains(&candidate) {
                            if candidate != module && !module.starts_with(&format!("{candidate}::")) {
                                uses.insert(candidate);
                            }
                            break;
                        }
                    }
                }
            }
        }
        graph.insert(module, uses);
    }
    graph
}

/// A cycle of the graph, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    return Some([&path[start..], std::slice::from_ref(next)].concat());
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn no_crate_has_a_module_cycle() {
    for (name, _) in LAYERS {
        let graph = module_graph(&crates_dir().join(name).join("src"));
        assert!(graph.len() > 1, "{name}: no modules found");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{name}: modules in a cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")].into_iter().fold(BTreeMap::new(), |mut g, (from, to)| {
            g.entry(from.to_string()).or_insert_with(BTreeSet::new).insert(to.to_string());
            g
        });
    assert_eq!(find_cycle(&graph).unwrap().len(), 4);
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert!(find_cycle(&acyclic).is_none());
}
