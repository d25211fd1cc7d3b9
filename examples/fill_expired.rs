//! Fills a wxauth data directory with expired refresh-token records, for the purge
//! benchmark (`bench/purge_p99.sh`): logins measured while the server purges them.
//!
//! ```text
//! cargo run --release --example fill_expired -- DATA_DIR RECORDS
//! ```
//!
//! RECORDS records in all: RECORDS/2 login families, each with one refresh token,
//! all expired a day ago. Keys are 32 hex characters spread over the key space like
//! the server's random ids, so live records land between them. It writes through
//! the crate's storage API and record encoders (`SledStore`, `WriteBatch`,
//! `tokens::records`), so the records are what the token issuer writes. The server
//! must not be running on the directory.

use std::path::PathBuf;
use std::time::Instant;
use wxauth::storage::{SledStore, Store, Tree, WriteBatch};
use wxauth::tokens::records::{self, Family, RefreshRecord};

/// Families per batch (two records each).
const BATCH: u64 = 1000;
/// The server's default `storage.cache_capacity`.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// A 32-hex-character id for `n`, scattered (a bijective mix, so ids never collide).
fn scattered_id(n: u64, salt: u64) -> String {
    let mut x = n ^ salt;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{x:016x}{:016x}", n ^ salt)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fill_expired DATA_DIR RECORDS";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let records_total: u64 = args.next().ok_or(usage)?.parse()?;
    let families = records_total / 2;

    let started = Instant::now();
    let store = SledStore::open(&dir, CACHE_CAPACITY)?;
    let expired_at = wxauth::now_unix() - 86_400;
    let mut done = 0u64;
    while done < families {
        let n = BATCH.min(families - done);
        let mut batch = WriteBatch::default();
        for i in done..done + n {
            let family_id = scattered_id(i, 0x5eed_f00d);
            let jti = scattered_id(i, 0x00dd_ba11);
            let user_id = 1 + i % 1000;
            let record = RefreshRecord {
                family: family_id.clone(),
                user_id,
                exp: expired_at,
                rotated_at_ms: None,
            };
            let family = Family {
                user_id,
                created_at: expired_at - 86_400,
                exp: expired_at,
                current: jti.clone(),
                revoked_at: None,
            };
            batch.put(Tree::RefreshTokens, jti, records::encode(&record));
            batch.put(Tree::TokenFamilies, family_id, records::encode(&family));
        }
        store.apply(batch)?;
        done += n;
        if done % 100_000 == 0 {
            eprintln!(
                "fill_expired: {} records, {:.1?}",
                done * 2,
                started.elapsed()
            );
        }
    }
    store.flush()?;
    eprintln!(
        "fill_expired: {} expired records ({families} families, {families} refresh tokens) in {} in {:.1?}",
        families * 2,
        dir.display(),
        started.elapsed()
    );
    Ok(())
}
