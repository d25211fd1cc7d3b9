//! The schema, as versioned migrations compiled into the binary, applied at start.
//!
//! One transaction does it all, under a transaction-scoped advisory lock: two nodes
//! starting at once take turns, and the second finds the work done. PostgreSQL's DDL
//! is transactional, so a migration that fails leaves nothing half-applied. A
//! database whose schema is newer than this binary knows is refused: an older
//! binary must not write to a layout it does not understand.

use super::pg_error;
use crate::storage::StorageError;

/// One step of the schema. Versions are 1, 2, 3, … in order; a released step is
/// never edited, only followed by another.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "users, openid and unionid keys, families, access tokens",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "the user's profile and deletion",
        sql: include_str!("migrations/0002_account.sql"),
    },
    Migration {
        version: 3,
        name: "the outbox of events",
        sql: include_str!("migrations/0003_outbox.sql"),
    },
];

/// The schema version this binary writes.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The advisory lock that serializes migrations across nodes ("wxauth" in ASCII,
/// then 1): the same number on every node, unlikely to collide with an application's.
const MIGRATION_LOCK: i64 = 0x7778_6175_7468_0001;

/// What [`run`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version the database had before.
    pub from: i32,
    /// The version it has now ([`latest`]).
    pub to: i32,
}

/// Brings the database to [`latest`], or refuses a newer one.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Migrated, StorageError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("cannot begin the migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_error("cannot take the migration lock", e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS wxauth_schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| pg_error("cannot create wxauth_schema_migrations", e))?;
    let from: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM wxauth_schema_migrations",
            &[],
        )
        .await
        .map_err(|e| pg_error("cannot read the schema version", e))?
        .get(0);
    let known = latest();
    if from > known {
        return Err(StorageError::unavailable(format!(
            "the database's schema is version {from}, newer than this wxauth knows \
             (version {known}): a newer release migrated it; run that release (or newer)"
        )));
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.batch_execute(migration.sql).await.map_err(|e| {
            pg_error(
                format!(
                    "migration {} ({}) failed",
                    migration.version, migration.name
                ),
                e,
            )
        })?;
        tx.execute(
            "INSERT INTO wxauth_schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(|e| pg_error("cannot record a migration", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| pg_error("cannot commit the migration", e))?;
    if from < known {
        tracing::info!(from, to = known, "migrated the PostgreSQL schema");
    }
    Ok(Migrated { from, to: known })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
    }
}
