//! Helpers for every scae test (library, tool and end-to-end): where the fixtures and the built
//! tool binaries are, scratch folders, running a tool and checking how it failed, and comparing
//! tensors. It depends on candle alone (not on `scae`), so the library's own tests can use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// The repository's `tests/fixtures` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A fixture model folder (`tests/fixtures/models/<name>`).
pub fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The fixture suite of model `name` (bare safetensors with k and n_features metadata).
pub fn fixture_suite(name: &str) -> PathBuf {
    fixtures().join("suites").join(name).join("suite.safetensors")
}

/// Every tensor of a safetensors file, on the CPU.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A golden file `tests/fixtures/golden/<name>.safetensors`.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    load(&fixtures().join(format!("golden/{name}.safetensors")))
}

/// The largest absolute entry of `t` (f32; 0 for an empty tensor).
pub fn max_abs(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).expect("f32").flatten_all().expect("flat");
    if t.elem_count() == 0 {
        return 0.0;
    }
    t.abs().expect("abs").max(0).expect("max").to_scalar::<f32>().expect("scalar")
}

/// `max |a − b|` of two tensors of one shape (compared in f32); panics on a shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    max_abs(&(f(a) - f(b)).expect("sub"))
}

/// The folder holding the tool binaries of the current build profile.
pub fn bin_dir() -> PathBuf {
    // .../target/<profile>/deps/<test-exe> -> .../target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// Run tool `name` with `args`; panics with a hint when the binary was not built.
pub fn tool(name: &str, args: &[&str]) -> Output {
    let bin = bin_dir().join(name);
    assert!(bin.is_file(), "{} is missing; run `cargo build --release --workspace` (make test does)", bin.display());
    Command::new(&bin).args(args).output().expect("run tool")
}

/// Run a tool and require success; returns stdout.
pub fn tool_ok(name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    assert!(o.status.success(), "{name} {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Whether a stderr line of tool `name` is progress (`name: step 3/10 (30%), ...`,
/// `name: 4,096/32,768 tokens (12%), ...`) or says which pass runs (`name: pass: ...`): what
/// a tool prints besides its one-line error.
pub fn is_info_line(line: &str, name: &str) -> bool {
    let Some(rest) = line.strip_prefix(&format!("{name}: ")) else { return false };
    let count = rest.split_whitespace().next().unwrap_or("");
    rest.starts_with("pass: ")
        || (rest.starts_with("step ") && rest.contains('/'))
        || (count.chars().next().is_some_and(|c| c.is_ascii_digit())
            && count.chars().all(|c| c.is_ascii_digit() || c == ',' || c == '/')
            && rest.contains(" tokens"))
}

/// The lines of a tool's stderr that are not [progress or the pass it runs](is_info_line).
pub fn error_lines<'a>(stderr: &'a str, name: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| !l.trim().is_empty() && !is_info_line(l, name)).collect()
}

/// Run a tool that must fail with exit code 1 and a one-line message starting `<name>: ` that
/// contains every needle (besides progress and the pass it runs); returns the message.
pub fn tool_fails(name: &str, args: &[&str], needles: &[&str]) -> String {
    let o = tool(name, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{name} {args:?}: expected exit 1, stderr: {err}");
    assert!(err.starts_with(&format!("{name}: ")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
    err
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("scae-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A cache (made by collect-acts in `dir/acts`) of the suite golden's tokens (3 x 12) for the
/// fixture model `name`.
pub fn golden_cache(dir: &Path, name: &str) -> PathBuf {
    let acts = dir.join("acts");
    let g = fixtures().join(format!("golden/suite-{name}.safetensors"));
    let m = fixture_model(name);
    tool_ok(
        "collect-acts",
        &["--model", s(&m), "--tokens", s(&g), "--ctx-len", "12", "--no-prepend-bos", "--out", s(&acts)],
    );
    acts
}
