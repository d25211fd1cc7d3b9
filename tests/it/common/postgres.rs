//! A real, throw-away PostgreSQL for the tests: one cluster per test process (initdb
//! into a temp dir, a random loopback port, TLS on with a test CA), a database per
//! test. Debian's `postgresql` package provides the binaries (`.ci/run` installs it).
//! Under `CI=true` a missing PostgreSQL fails the test; elsewhere it is skipped loudly.
//!
//! PostgreSQL refuses to run as root: as root, the cluster's files belong to the
//! `postgres` OS user and every server command runs as that user (runuser). When the
//! test process ends, a small watcher stops the cluster and removes its directory.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub struct PgCluster {
    /// Holds `data/`, the server's log, the socket and the test CA.
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Run server commands as this OS user (`Some("postgres")` when we are root).
    run_as: Option<&'static str>,
}

/// The directory of initdb, pg_ctl, psql, pgbench: the newest installed major version.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The cluster shared by this test process, or `None` (after a loud SKIPPED) when
/// PostgreSQL is not installed outside CI.
pub fn cluster(test: &str) -> Option<&'static PgCluster> {
    static SHARED: OnceLock<Option<PgCluster>> = OnceLock::new();
    let shared = SHARED.get_or_init(PgCluster::start);
    if shared.is_none() {
        assert!(
            !in_ci(),
            "{test}: PostgreSQL is not installed, and CI=true: .ci/run must install it \
             (apt-get install postgresql)"
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED {test}: PostgreSQL is not installed \
             (apt-get install postgresql); CI=true makes this a failure !!!!!!!!\n"
        );
    }
    shared.as_ref()
}

/// A private cluster (a test that stops and starts the server), or `None` as above.
pub fn private_cluster(test: &str) -> Option<PgCluster> {
    let started = PgCluster::start();
    if started.is_none() {
        assert!(!in_ci(), "{test}: PostgreSQL is not installed, and CI=true");
        eprintln!("\n!!!!!!!! SKIPPED {test}: PostgreSQL is not installed !!!!!!!!\n");
    }
    started
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

impl PgCluster {
    fn start() -> Option<PgCluster> {
        let bin = postgres_bin()?;
        let run_as = rustix::process::geteuid().is_root().then_some("postgres");
        let dir = tempfile::Builder::new()
            .prefix("wxauth-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let cluster = PgCluster {
            dir,
            port: free_port(),
            bin,
            run_as,
        };
        cluster.write_tls_files();
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(&cluster.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory");
        }
        cluster.watch_for_exit();
        cluster.server_command(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.start_server();
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The test CA's certificate (the server's is signed by it, for localhost and
    /// 127.0.0.1).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn write_tls_files(&self) {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "wxauth test PostgreSQL CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).expect("server certificate");
        std::fs::write(self.ca_file(), ca_cert.pem()).unwrap();
        std::fs::write(self.dir.join("server.crt"), cert.pem()).unwrap();
        let key_path = self.dir.join("server.key");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Everyone may read the CA (the wxauth under test runs as us).
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Stops the cluster and removes its directory once this test process is gone.
    fn watch_for_exit(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!(
            "{} {} -D {} -m immediate stop",
            self.run_as
                .map_or(String::new(), |u| format!("runuser -u {u} --")),
            pg_ctl.display(),
            self.data().display()
        );
        // In the background of a shell that exits at once: the watcher outlives us.
        let script = format!(
            "(while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {dir}) \
             </dev/null >/dev/null 2>&1 &",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let started = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start the cluster's watcher");
        assert!(started.success(), "start the cluster's watcher");
    }

    /// Runs one of PostgreSQL's programs (as the postgres user when we are root).
    fn server_command(&self, program: &str, args: &[&str]) -> String {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts (or starts again) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c max_connections=200 \
             -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
            port = self.port,
            dir = self.dir.display()
        );
        self.server_command(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once (as a crash would).
    pub fn stop_server(&self) {
        self.server_command(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// A new, empty database; returns its URL (TLS off: see [`Self::url`] for others).
    pub fn create_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let name = format!("wxauth_test_{}", NEXT.fetch_add(1, Ordering::SeqCst));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name, "sslmode=disable")
    }

    /// The URL of `database` with `params` (e.g. `sslmode=require`).
    pub fn url(&self, database: &str, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?{params}",
            self.port
        )
    }

    /// The database name in a URL made by [`Self::create_database`].
    pub fn database_of(url: &str) -> &str {
        url.rsplit('/')
            .next()
            .and_then(|rest| rest.split('?').next())
            .expect("a database in the URL")
    }

    /// Runs SQL with psql over TCP; returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", database, "-c", sql])
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The path of one of PostgreSQL's programs (pgbench, for one).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}
