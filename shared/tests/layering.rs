//! The house rules of docs/ARCHITECTURE.md, checked on the source: the library's layering (a
//! file in one group names, as `crate::<group>`, only groups ranked below its own, so the
//! groups form no circle; a new top-level module must be given a rank here and in the
//! document), and the size limits of tools' `main.rs` and of library files.

use std::path::{Path, PathBuf};

/// The groups from the bottom up; a group may use the groups on earlier lines only (those on
/// one line are independent of each other).
const RANKS: &[&[&str]] = &[
    &["error"],
    &["util"],
    &["model"],
    &["data"],
    &["sae"],
    &["formats"],
    &["inputs"],
    &["pass"],
    &["train"],
    &["attrib"],
    &["scores", "eval", "browse"],
    &["cli"],
];

/// Macros exported at the crate root, by the group that defines them.
const MACROS: &[(&str, &str)] = &[("note", "util"), ("widest", "util"), ("say", "cli")];

fn rank(group: &str) -> Option<usize> {
    RANKS.iter().position(|r| r.contains(&group))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable src folder") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crate::<name>` in `text` outside comments, as (line number, name).
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            out.push((n + 1, name));
            rest = tail;
        }
    }
    out
}

#[test]
fn every_import_follows_the_layering() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let group = first.trim_end_matches(".rs").to_string();
        if group == "lib" {
            continue;
        }
        let Some(own) = rank(&group) else {
            wrong.push(format!("{}: group `{group}` has no rank in RANKS", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable source");
        for (line, name) in crate_paths(&text) {
            let target = MACROS.iter().find(|(m, _)| *m == name).map_or(name.as_str(), |(_, g)| g);
            if target == group {
                continue;
            }
            match rank(target) {
                None => wrong.push(format!("{}:{line}: crate::{name} is no group (name a module path)", rel.display())),
                Some(r) if r >= own => {
                    wrong.push(format!("{}:{line}: `{group}` uses `{target}`, which is not below it", rel.display()))
                }
                Some(_) => {}
            }
        }
    }
    assert!(files.len() > 50, "found only {} source files under {}", files.len(), src.display());
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_imports_and_skips_comments() {
    let found = crate_paths("use crate::pass::Plan; // crate::cli\n/// [`crate::eval`]\nlet x = crate::note!(\"a\");");
    assert_eq!(found, vec![(1, "pass".to_string()), (3, "note".to_string())]);
}

/// Lines of a file.
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).expect("readable source").lines().count()
}

/// docs/ARCHITECTURE.md, "Thin tools": every tool's `main.rs` at most 150 lines (flags, a
/// validated config, a library runner, a printed summary), every library file at most 600.
#[test]
fn tools_stay_thin_and_library_files_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let mut long = Vec::new();
    let mut tools = 0;
    for e in std::fs::read_dir(root.join("tools")).expect("tools folder") {
        let main = e.expect("entry").path().join("src").join("main.rs");
        if main.is_file() {
            tools += 1;
            if lines(&main) > 150 {
                long.push(format!("{}: {} lines (at most 150)", main.display(), lines(&main)));
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&root.join("shared").join("src"), &mut files);
    for f in files.iter().filter(|f| lines(f) > 600) {
        long.push(format!("{}: {} lines (at most 600)", f.display(), lines(f)));
    }
    assert!(tools >= 9, "found only {tools} tools under {}", root.join("tools").display());
    assert!(long.is_empty(), "{}", long.join("\n"));
}
