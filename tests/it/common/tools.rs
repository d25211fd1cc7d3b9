//! Tools from outside Rust that some tests drive (a proxy, promtool, Python and npm
//! packages). `.ci/run` installs them; under `CI=true` a missing one fails the test,
//! elsewhere the test prints a loud SKIPPED line and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Is this CI, where a missing tool is a failure rather than a skipped test?
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Fails `test` in CI; elsewhere prints a loud SKIPPED line (the caller returns).
pub fn skip(test: &str, what: &str) {
    assert!(
        !in_ci(),
        "{test}: {what} (CI=true: .ci/run must install it)"
    );
    eprintln!("\n!!!!!!!! SKIPPED {test}: {what}. Run .ci/run to install it.\n");
}

/// The first of `candidates` that exists, else `name` found on `PATH`.
pub fn find_binary(name: &str, candidates: &[&Path]) -> Option<PathBuf> {
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Some(found.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The repository's own file `path`.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The Python virtual environment `.ci/run` prepares: `$TEST_VENV`, else `target/venv`.
pub fn test_venv() -> PathBuf {
    std::env::var_os("TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_file("target/venv"))
}

/// The venv's `bin/NAME` (a console script or the interpreter), when it is there.
pub fn venv_binary(name: &str) -> Option<PathBuf> {
    let path = test_venv().join("bin").join(name);
    path.is_file().then_some(path)
}

/// The venv's python when it imports every module of `modules`.
pub fn venv_python_with(modules: &[&str]) -> Option<PathBuf> {
    let python = venv_binary("python")?;
    let imports = format!("import {}", modules.join(", "));
    Command::new(&python)
        .args(["-c", &imports])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(python)
}

/// A per-test scratch directory for npm packages, under target/ so that a fresh
/// checkout starts clean: `$TEST_NODE_TOOLS`, else `target/node-tools`.
pub fn node_tools() -> PathBuf {
    std::env::var_os("TEST_NODE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_file("target/node-tools"))
}
