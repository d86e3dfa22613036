//! The library's layers, checked: a module may use only modules below it, so the arrows of the
//! import graph run one way (the binary, `src/bin/kaiwa/`, stands above them all). A new module
//! must be given its place here, and an import upwards or sideways fails the test unless it is
//! one of the few listed as still to be undone, a list that may only shrink. Unit-test modules
//! are not counted: they may build their fixtures with any layer.

use std::collections::BTreeSet;
use std::path::Path;

/// Each module with its layer; a module may use modules of lower layers only.
const LAYERS: &[(&str, u8)] = &[
    // The shared vocabulary and utilities every layer may use.
    ("domain", 0),
    ("text", 0),
    ("clock", 0),
    ("fsio", 0),
    ("kernels", 0),
    ("metrics", 0),
    ("shutdown", 0),
    ("backoff", 1),
    // Storage and the model runtime.
    ("store", 1),
    ("model", 1),
    ("conversation", 2),
    // The data files: one reader, and examples as the model sees them.
    ("dataset", 2),
    // Data: corpora in and out, training.
    ("corpus", 3),
    ("train", 3),
    // Replies.
    ("engine", 4),
    ("eval", 5),
    ("config", 5),
    ("chat", 5),
    ("bot", 6),
    // The learning loop: export, fine-tune, evaluate, install.
    ("retrain", 6),
    // Edges: the platforms and the web, the daemon that runs them, the benchmarks.
    ("platform", 7),
    ("web", 7),
    ("app", 8),
    ("bench", 9),
];

/// Imports against the layers that are still to be undone: none now. A move that cannot be
/// finished in one commit may list its `(from, to)` here, and must take it off when done.
const STILL_TO_UNDO: &[(&str, &str)] = &[];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

/// `(from, to)` for every `crate::to` in a module's code (comments aside).
fn imports(src: &Path) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                files.push(entry.unwrap().path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let from = Path::new(first)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if from == "bin" || from == "lib" || from == "layers" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // A file's unit tests (its `#[cfg(test)]` module, last by convention) may make their
        // fixtures with any layer: a tokenizer's tests use a tokenizer that `train` trained.
        let code = [
            "\n#[cfg(test)]\nmod tests {",
            "\n#[cfg(test)]\npub(crate) mod tests {",
        ]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .map_or(text.as_str(), |end| &text[..end]);
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let to: String = line[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `kaiwa_crate::…` or a name that only ends in "crate" is not a path.
                let before = line[..i].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                if to != from {
                    out.insert((from.clone(), to));
                }
            }
        }
    }
    out
}

#[test]
fn imports_run_down_the_layers_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = imports(&src);
    let mut wrong = Vec::new();
    for (from, to) in &found {
        let Some(from_layer) = layer(from) else {
            wrong.push(format!("module `{from}` has no layer in src/layers.rs"));
            continue;
        };
        // Items of the crate root are not modules.
        let Some(to_layer) = layer(to) else {
            continue;
        };
        if to_layer >= from_layer && !STILL_TO_UNDO.contains(&(from.as_str(), to.as_str())) {
            wrong.push(format!(
                "`{from}` (layer {from_layer}) uses `{to}` (layer {to_layer})"
            ));
        }
    }
    for (from, to) in STILL_TO_UNDO {
        if !found.contains(&(from.to_string(), to.to_string())) {
            wrong.push(format!(
                "`{from}` no longer uses `{to}`: take it off STILL_TO_UNDO"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_an_import_upwards() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("store")).unwrap();
    std::fs::write(
        dir.path().join("store/mod.rs"),
        "// crate::bot in a comment is not an import\nuse crate::bot::event::Platform;\nuse crate::domain::ChannelRef;\n",
    )
    .unwrap();
    let found = imports(dir.path());
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [
            ("store".to_string(), "bot".to_string()),
            ("store".to_string(), "domain".to_string())
        ]
    );
}
