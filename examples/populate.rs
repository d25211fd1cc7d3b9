//! Fills a wxauth data directory with users, for the `scale` benchmark
//! (`bench/run.sh`): creating a million users through HTTP would take minutes.
//!
//! ```text
//! cargo run --release --example populate -- DATA_DIR COUNT [APPID] [OPENID_PREFIX]
//! ```
//!
//! Defaults: the built-in mock's appid (`wx_mock`) and its openid prefix
//! (`mock-openid-`). User `i` (0-based) gets the openid `<OPENID_PREFIX>s<i>`, so the
//! mock code `s<i>.anything` logs them in; with `mock_wechat`, use the prefix `o-`
//! and the appid it was given.
//!
//! It writes through the crate's own storage API and record encoders
//! (`SledStore`, `WriteBatch`, `users::encode`, `users::openid_key`), so the records
//! are byte for byte what the server's user registry writes: the `users` record,
//! the `users_by_openid` index and `meta/next_user_id`. Ids continue from the
//! directory's `next_user_id`. The server must not be running on the directory.

use std::path::PathBuf;
use std::time::Instant;
use wxauth::secret::SessionKey;
use wxauth::storage::sled::SledStore;
use wxauth::storage::{ReadStore, Store, Tree, WriteBatch};
use wxauth::users::{self, User, NEXT_USER_ID_KEY};

/// Users per atomic batch: large enough to amortize sled's transaction cost.
const BATCH: u64 = 1000;
/// The server's default `storage.cache_capacity`.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: populate DATA_DIR COUNT [APPID] [OPENID_PREFIX]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let count: u64 = args.next().ok_or(usage)?.parse()?;
    let appid = args
        .next()
        .unwrap_or_else(|| wxauth::config::MOCK_APPID.to_string());
    let prefix = args.next().unwrap_or_else(|| "mock-openid-".to_string());

    let started = Instant::now();
    let store = SledStore::open(&dir, CACHE_CAPACITY)?;
    let first_id = match store.get(Tree::Meta, NEXT_USER_ID_KEY)? {
        Some(bytes) => users::decode_id(Tree::Meta, &bytes)?,
        None => 1,
    };
    let now = wxauth::clock::now_unix();
    let mut done = 0u64;
    while done < count {
        let n = BATCH.min(count - done);
        let mut batch = WriteBatch::default();
        for i in done..done + n {
            let id = first_id + i;
            let openid = format!("{prefix}s{i}");
            // The same length of session key as the mock and WeChat hand out.
            let session_key =
                SessionKey::new(format!("{:024x}", id.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let user = User::new(id, &appid, &openid, None, session_key, now);
            batch.put(
                Tree::UsersByOpenid,
                users::openid_key(&appid, &openid),
                users::id_key(id),
            );
            batch.put(Tree::Users, users::id_key(id), users::encode(&user));
        }
        done += n;
        batch.put(Tree::Meta, NEXT_USER_ID_KEY, users::id_key(first_id + done));
        store.apply(batch)?;
        if done % 100_000 == 0 {
            eprintln!("populate: {done} users, {:.1?}", started.elapsed());
        }
    }
    store.flush()?;
    eprintln!(
        "populate: {count} users (ids {first_id}..{}) in {} in {:.1?}",
        first_id + count - 1,
        dir.display(),
        started.elapsed()
    );
    Ok(())
}
