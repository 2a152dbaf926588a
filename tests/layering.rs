//! Data flows one way: watch -> targets -> batches -> snapshot -> body. A module of the library never
//! refers (`crate::…`, or `super::…` between the files of `discovery`) to one later in that flow:
//! discovery (watch, names, plan, ingress) -> discovery::inventory (targets) -> discovery::pools ->
//! collector (batches, snapshot) -> handover (the leader's snapshot, mirrored by followers) -> exposition (body) -> server -> app -> demo -> cli. The leaves (config, cloud, signer, telemetry, clock,
//! annotations, memory, logging, leader, schedule, sim) are usable by every module and refer to no
//! flow module. Test modules inside `src/` count too: a test that reaches up ties the layers as much
//! as the code does.

use std::path::{Path, PathBuf};

/// Position in the flow; modules not listed are leaves (rank 0).
const FLOW: &[(&str, u32)] = &[
    ("discovery", 1),
    ("discovery::inventory", 2),
    ("discovery::pools", 3),
    ("collector", 4),
    ("handover", 5),
    ("exposition", 6),
    ("server", 7),
    ("app", 8),
    ("demo", 9),
    ("cli", 10),
];

/// The files of `discovery` that are stages of their own; the others are part of `discovery`.
const DISCOVERY_STAGES: &[&str] = &["inventory", "pools"];

/// Leaves: modules outside the flow. Listed so that a new top-level module has to be placed.
const LEAVES: &[&str] = &[
    "annotations",
    "clock",
    "cloud",
    "config",
    "leader",
    "logging",
    "memory",
    "schedule",
    "signer",
    "sim",
    "telemetry",
];

fn rank(module: &str) -> Option<u32> {
    if LEAVES.contains(&module) {
        return Some(0);
    }
    FLOW.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The layer a file belongs to: its top-level module, or a stage of `discovery`.
fn layer_of_file(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    layer_of_path(&parts.join("::"))
}

/// The layer a path after `crate::` names (`discovery::inventory::Targets` -> `discovery::inventory`).
fn layer_of_path(path: &str) -> String {
    let mut segs = path.split("::");
    let first = segs.next().unwrap_or_default();
    match segs.next() {
        Some(stage) if first == "discovery" && DISCOVERY_STAGES.contains(&stage) => {
            format!("discovery::{stage}")
        }
        _ => first.to_string(),
    }
}

/// Every top-level module a line refers to through `crate::`, including `crate::{a, b::c}` groups.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            out.extend(
                inner
                    .split(',')
                    .map(|p| p.trim())
                    .filter(|p| !p.is_empty())
                    .map(layer_of_path),
            );
        } else {
            let path: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(layer_of_path(&path));
        }
        rest = after;
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `file:line: from -> to` for each reference that goes up the flow or names an unplaced module.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src/");
        // The binary and the crate root sit above every layer.
        if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let from = layer_of_file(rel);
        let text = std::fs::read_to_string(&file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            // Comments (and doc links) are not references.
            let code = line.split("//").next().unwrap_or_default();
            let mut refs = crate_refs(code);
            // Between the files of discovery, `super::<stage>` reaches that stage.
            if from.starts_with("discovery") {
                for stage in DISCOVERY_STAGES {
                    if code.contains(&format!("super::{stage}")) {
                        refs.push(format!("discovery::{stage}"));
                    }
                }
            }
            for to in refs {
                let place = format!("{}:{}", rel.display(), n + 1);
                match (rank(&from), rank(&to)) {
                    (Some(a), Some(b)) if from == to || b < a || b == 0 => {}
                    (Some(_), Some(_)) => {
                        found.push(format!("{place}: {from} -> {to} (up the flow)"))
                    }
                    (None, _) => {
                        found.push(format!("{place}: {from} is not placed in FLOW or LEAVES"))
                    }
                    (_, None) => {
                        found.push(format!("{place}: {to} is not placed in FLOW or LEAVES"))
                    }
                }
            }
        }
    }
    found
}

#[test]
fn no_module_refers_to_one_later_in_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "references against the flow (see tests/layering.rs):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_finds_references_and_layers() {
    assert_eq!(
        crate_refs("use crate::{config::Config, collector::Snapshot};"),
        ["config", "collector"]
    );
    assert_eq!(
        crate_refs("let t: crate::discovery::inventory::Targets = x(crate::app::y);"),
        ["discovery::inventory", "app"]
    );
    assert_eq!(rank("telemetry"), Some(0));
    assert!(rank("collector") > rank("discovery::inventory"));
    assert_eq!(
        layer_of_file(Path::new("discovery/pools.rs")),
        "discovery::pools"
    );
    assert_eq!(layer_of_file(Path::new("discovery/names.rs")), "discovery");
    assert_eq!(layer_of_file(Path::new("sim/cloud/ces.rs")), "sim");
}
