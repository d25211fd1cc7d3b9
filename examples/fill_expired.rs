//! Fills a wxauth data directory with expired refresh-token records, for the purge
//! benchmark (`bench/purge_p99.sh`): logins measured while the server purges them.
//!
//! ```text
//! cargo run --release --example fill_expired -- DATA_DIR RECORDS
//! ```
//!
//! RECORDS family records (one per login), all expired a day ago, over 1,000 users.
//! Family ids are spread over the key space like the server's random ids, so live
//! records land between them. It writes through the crate's storage API and record
//! encoder (`SledStore`, `WriteBatch`, `storage::encode_family`), so the records are
//! what a login writes. The server must not be running on the directory.

use std::path::PathBuf;
use std::time::Instant;
use wxauth::storage::model::{family_key, FamilyId, FamilyRecord};
use wxauth::storage::sled::SledStore;
use wxauth::storage::sled_model::encode_family;
use wxauth::storage::{Store, Tree, WriteBatch};

/// Families per batch.
const BATCH: u64 = 1000;
/// The server's default `storage.cache_capacity`.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// A family id for `n`, scattered (a bijective mix, so ids never collide).
fn scattered_id(n: u64, salt: u64) -> FamilyId {
    let mut x = n ^ salt;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&x.to_be_bytes());
    id[8..].copy_from_slice(&(n ^ salt).to_be_bytes());
    FamilyId(id)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fill_expired DATA_DIR RECORDS";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let records_total: u64 = args.next().ok_or(usage)?.parse()?;
    let families = records_total;

    let started = Instant::now();
    let store = SledStore::open(&dir, CACHE_CAPACITY)?;
    let expired_at = wxauth::clock::now_unix() - 86_400;
    let mut done = 0u64;
    while done < families {
        let n = BATCH.min(families - done);
        let mut batch = WriteBatch::default();
        for i in done..done + n {
            let id = scattered_id(i, 0x5eed_f00d);
            let user_id = 1 + i % 1000;
            let family = FamilyRecord {
                user_id,
                id,
                generation: 1,
                created_ms: (expired_at - 86_400) * 1000,
                rotated_ms: (expired_at - 86_400) * 1000,
                exp: expired_at,
                revoked_ms: None,
                stamp: 0,
            };
            batch.put(
                Tree::Families,
                family_key(user_id, id),
                encode_family(&family),
            );
        }
        store.apply(batch)?;
        done += n;
        if done % 100_000 == 0 {
            eprintln!("fill_expired: {} records, {:.1?}", done, started.elapsed());
        }
    }
    store.flush()?;
    eprintln!(
        "fill_expired: {} expired family records in {} in {:.1?}",
        families,
        dir.display(),
        started.elapsed()
    );
    Ok(())
}
