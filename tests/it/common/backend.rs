//! Running a binary test on each storage backend: sled, then PostgreSQL (a fresh
//! database on the test process's cluster, common::postgres).

use super::TestConfig;

/// Where the server keeps its data.
pub enum Backend {
    Sled,
    /// A fresh database on the test cluster.
    Postgres(String),
}

impl Backend {
    /// `config` with its storage on this backend.
    pub fn configure(&self, config: TestConfig) -> TestConfig {
        match self {
            Backend::Sled => config,
            Backend::Postgres(url) => config
                .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
                .with_env("WXAUTH_STORAGE__POSTGRES_URL", url),
        }
    }
}

/// Runs `test` on sled, then on PostgreSQL (skipped, loudly, where the harness has
/// no cluster and CI is not set).
pub fn on_both(name: &str, test: fn(&Backend)) {
    test(&Backend::Sled);
    if let Some(pg) = super::postgres::cluster(name) {
        test(&Backend::Postgres(pg.create_database()));
    }
}
