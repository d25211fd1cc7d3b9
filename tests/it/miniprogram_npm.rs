//! The mini-program package (clients/miniprogram) installed the ways its README says,
//! with the real npm, into a scratch project: the copy in `node_modules` is a real one
//! and stays one at the next `npm install`, and `tsc --strict` checks a file using it
//! against miniprogram-api-typings.

use crate::common;

use common::tools;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a mini-program's TypeScript code does with the package.
const USES_THE_PACKAGE: &str = r#"
import { createClient, WxAuthError } from 'wxauth-miniprogram';

const auth = createClient({ baseUrl: 'https://auth.example.com', refreshAheadSeconds: 30 });

async function show(): Promise<string> {
  const user = await auth.user();
  const res = await auth.request<{ code: string }>({ url: '/api/weixin/data/', method: 'GET' });
  return `${user.id} ${res.statusCode} ${res.data.code.toUpperCase()}`;
}

show().catch((e: unknown) => {
  if (e instanceof WxAuthError) console.log(e.status, e.code);
});
"#;

/// The tsconfig.json the package's README gives.
fn readme_tsconfig() -> String {
    let readme = std::fs::read_to_string(tools::repo_file("clients/miniprogram/README.md"))
        .expect("the package's README");
    let start = readme
        .find("```json\n{\n  \"compilerOptions\"")
        .expect("a tsconfig.json in the package's README");
    let body = &readme[start + "```json\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

/// Runs `program args` in `dir`, panicking with its output unless it succeeds.
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let said = tools::output_text(&out);
    assert!(
        out.status.success(),
        "{program} {args:?} in {} failed:\n{said}",
        dir.display()
    );
    said
}

fn npm_install(dir: &Path, packages: &[&str]) {
    let mut args = vec!["install", "--no-audit", "--no-fund", "--loglevel=error"];
    args.extend_from_slice(packages);
    run(dir, "npm", &args);
}

/// `node_modules/wxauth-miniprogram` is a directory of its own, not a link.
fn assert_real_copy(project: &Path, when: &str) {
    let installed = project.join("node_modules/wxauth-miniprogram");
    let meta = std::fs::symlink_metadata(&installed)
        .unwrap_or_else(|e| panic!("{when}: {}: {e}", installed.display()));
    assert!(
        meta.is_dir() && !meta.file_type().is_symlink(),
        "{when}: {} is a link, not a copy",
        installed.display()
    );
    assert!(installed.join("index.d.ts").is_file(), "{when}");
}

/// One install way, start to end: install, `npm install` again, `tsc --strict`.
fn install_way(scratch: &Path, way: &str) {
    let project = scratch.join(way);
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("package.json"),
        "{\"name\": \"scratch-miniprogram\", \"private\": true}\n",
    )
    .unwrap();
    let package = tools::repo_file("clients/miniprogram");
    let package = package.to_str().unwrap();
    let readme =
        std::fs::read_to_string(tools::repo_file("clients/miniprogram/README.md")).unwrap();
    match way {
        "npmrc" => {
            let line = "echo 'install-links=true' >> .npmrc";
            assert!(readme.contains(line), "the README does not say {line:?}");
            std::fs::write(project.join(".npmrc"), "install-links=true\n").unwrap();
            npm_install(
                &project,
                &[package, "miniprogram-api-typings", "typescript"],
            );
        }
        "tarball" => {
            let line = "npm pack path/to/wxauth/clients/miniprogram";
            assert!(readme.contains(line), "the README does not say {line:?}");
            let packed = run(&project, "npm", &["pack", "--loglevel=error", package]);
            let tarball = packed
                .lines()
                .rev()
                .find(|l| l.trim().ends_with(".tgz"))
                .unwrap_or_else(|| panic!("npm pack named no tarball: {packed}"))
                .trim()
                .to_string();
            npm_install(
                &project,
                &[
                    &format!("./{tarball}"),
                    "miniprogram-api-typings",
                    "typescript",
                ],
            );
        }
        _ => unreachable!(),
    }
    assert_real_copy(&project, &format!("{way}: after the install"));
    // A teammate's checkout, or adding another package: a plain `npm install`.
    npm_install(&project, &[]);
    assert_real_copy(&project, &format!("{way}: after a second npm install"));

    std::fs::write(project.join("index.ts"), USES_THE_PACKAGE).unwrap();
    let mut tsconfig: serde_json::Value = serde_json::from_str(&readme_tsconfig()).unwrap();
    tsconfig["files"] = serde_json::json!(["index.ts"]);
    std::fs::write(project.join("tsconfig.json"), tsconfig.to_string()).unwrap();
    let tsc = project.join("node_modules/.bin/tsc");
    run(&project, tsc.to_str().unwrap(), &["-p", ".", "--strict"]);
}

#[test]
fn the_package_installs_lastingly_and_type_checks_strictly() {
    let test = "the_package_installs_lastingly_and_type_checks_strictly";
    if tools::find_binary("node", &[]).is_none() || tools::find_binary("npm", &[]).is_none() {
        return tools::skip(
            test,
            "node and npm are not installed (apt-get install nodejs npm)",
        );
    }
    // Under target/, so that a fresh checkout starts clean; npm's own cache keeps
    // the downloads.
    let base: PathBuf = tools::node_tools();
    std::fs::create_dir_all(&base).unwrap();
    let scratch = tempfile::tempdir_in(&base).unwrap();
    for way in ["npmrc", "tarball"] {
        install_way(scratch.path(), way);
    }
}
