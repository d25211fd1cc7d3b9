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

/// A finished command's stdout and stderr, as text, one after the other.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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

/// `node_tools()/NAME` with the npm `packages` installed (by `.ci/run`, or here once
/// when npm is reachable), or `None` (after `skip`) when node or npm is missing or the
/// install failed.
pub fn npm_packages(test: &str, name: &str, packages: &[&str]) -> Option<PathBuf> {
    // One install at a time: two npm runs in one directory corrupt it.
    static INSTALLS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if find_binary("node", &[]).is_none() || find_binary("npm", &[]).is_none() {
        skip(
            test,
            "node and npm are not installed (apt-get install nodejs npm)",
        );
        return None;
    }
    let dir = node_tools().join(name);
    let installed = |dir: &Path| {
        packages.iter().all(|p| {
            let bare = p
                .rsplit_once('@')
                .filter(|(n, _)| !n.is_empty())
                .map_or(*p, |(n, _)| n);
            dir.join("node_modules")
                .join(bare)
                .join("package.json")
                .is_file()
        })
    };
    if installed(&dir) {
        return Some(dir);
    }
    std::fs::create_dir_all(&dir).expect("create the npm tools directory");
    if !dir.join("package.json").exists() {
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n").unwrap();
    }
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .args(packages)
        .current_dir(&dir)
        .output()
        .expect("run npm");
    if !out.status.success() || !installed(&dir) {
        skip(
            test,
            &format!(
                "npm install {} failed in {}: {}",
                packages.join(" "),
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        return None;
    }
    Some(dir)
}
