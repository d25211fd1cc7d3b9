//! Decoded users for the token check: a data request reads its user here, with no
//! storage read and no JSON decode.
//!
//! Coherence. The user registry is the only writer of the users tree, and it
//! [`put`](UserCache::put)s every user record it wrote, right after the write
//! applied. A reader that misses reads the store and may
//! [`fill`](UserCache::fill) the entry, but only if the entry is still absent and no
//! registry write (nor a [`clear`](UserCache::clear)) touched the entry's shard
//! since before its read: each shard counts its writes (its generation), and the
//! reader's [`Ticket`] holds the count it saw before reading the store. So a record
//! read before a write can never be cached after that write, evictions in between or
//! not. The registry's writes are visible to the store's readers as soon as they
//! apply (before they are durable), and so they are here: the cache shows exactly
//! what the store shows. When the store reopens after a failed flush, writes that
//! were not durable may be gone: the cache is [`clear`](UserCache::clear)ed then.
//!
//! Bounded: at most `capacity` entries, in [`SHARDS`] shards that each evict an
//! arbitrary entry (the first in the map's randomly seeded order) when full.
//!
//! Trusted for a while. With a store shared by several nodes, this node learns of
//! the others' changes over a channel (`storage::postgres::listen`); when that
//! channel is lost, the entries are served at most a bound longer
//! ([`distrust_after`](UserCache::distrust_after)), then every lookup misses (and
//! reads the store) until the channel is back, the cache emptied and
//! [`trust`](UserCache::trust)ed again.

use super::{User, UserId};
use crate::storage::model::{AuthStore, StoreFuture};
use crate::storage::{ReadStore, StorageError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Entries kept by default. About 350 bytes each (the `User`, its strings, its map
/// slot), so about 6 MiB: the users active right now, not the whole user base.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// Independent locks: the HTTP workers reading and the registry writing rarely meet
/// on one. User ids are handed out in order, so `id % SHARDS` spreads them evenly.
const SHARDS: usize = 64;

pub struct UserCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
    /// Entries are served until this many milliseconds after `epoch`; [`ALWAYS`]: no
    /// end (the channel is up, or there is none).
    trusted_until_ms: AtomicU64,
    epoch: Instant,
}

/// `trusted_until_ms` when the entries are trusted with no end.
const ALWAYS: u64 = u64::MAX;

#[derive(Default)]
struct Shard {
    /// Registry writes and clears of this shard so far (only counts up).
    generation: u64,
    users: HashMap<UserId, Arc<User>>,
}

/// A miss, and what the shard looked like before the reader went to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    id: UserId,
    generation: u64,
}

/// What [`UserCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Arc<User>),
    /// Read the store, then offer the record to [`UserCache::fill`] with this ticket.
    Miss(Ticket),
}

impl UserCache {
    /// A cache of at most `capacity` users (rounded up to a multiple of the shard
    /// count). 0 keeps nothing: every lookup misses and goes to the store.
    pub fn new(capacity: usize) -> Self {
        UserCache {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            trusted_until_ms: AtomicU64::new(ALWAYS),
            epoch: Instant::now(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(ALWAYS - 1)
    }

    /// Whether entries may be served now: one atomic load while trusted.
    fn trusted(&self) -> bool {
        let until = self.trusted_until_ms.load(Ordering::Acquire);
        until == ALWAYS || self.elapsed_ms() < until
    }

    /// The channel that reports other nodes' changes is lost: entries are served for
    /// `bound` more at most, then every lookup misses and nothing is kept, until
    /// [`trust`](Self::trust). A second call before `trust` keeps the first end (a
    /// channel that keeps failing never extends it). `true` when this call set it.
    pub fn distrust_after(&self, bound: Duration) -> bool {
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(ALWAYS - 1);
        let until = self.elapsed_ms().saturating_add(bound_ms).min(ALWAYS - 1);
        self.trusted_until_ms
            .compare_exchange(ALWAYS, until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The channel is back: empties the cache (what it holds may predate a change
    /// nobody reported) and serves from it again.
    pub fn trust(&self) {
        self.clear();
        self.trusted_until_ms.store(ALWAYS, Ordering::Release);
    }

    /// The most entries this cache holds.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).users.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: UserId) -> &RwLock<Shard> {
        // The remainder is below SHARDS, so it fits any usize.
        &self.shards[(id % SHARDS as u64) as usize]
    }

    pub fn lookup(&self, id: UserId) -> Lookup {
        let shard = read(self.shard(id));
        match shard.users.get(&id) {
            Some(user) if self.trusted() => Lookup::Hit(user.clone()),
            _ => Lookup::Miss(Ticket {
                id,
                generation: shard.generation,
            }),
        }
    }

    /// A reader's record, read from the store after `ticket` was taken: kept only if
    /// the entry is still absent and no write or clear reached its shard meanwhile
    /// (then the record may be older than the store's).
    pub fn fill(&self, ticket: Ticket, user: &Arc<User>) {
        debug_assert_eq!(ticket.id, user.id);
        let mut shard = write(self.shard(ticket.id));
        if shard.generation == ticket.generation
            && !shard.users.contains_key(&ticket.id)
            && self.trusted()
        {
            self.insert(&mut shard, ticket.id, user.clone());
        }
    }

    /// The registry's write of `user`, after it applied: replaces whatever is cached.
    pub fn put(&self, user: User) {
        let id = user.id;
        let mut shard = write(self.shard(id));
        shard.generation += 1;
        self.insert(&mut shard, id, Arc::new(user));
    }

    /// The user changed elsewhere (another node, or a write whose answer may race
    /// others): drops the entry, and refuses every fill whose ticket was taken
    /// before (the record that reader got may be older than the change).
    pub fn forget(&self, id: UserId) {
        let mut shard = write(self.shard(id));
        shard.generation += 1;
        shard.users.remove(&id);
    }

    /// Forgets every entry, and refuses every fill whose ticket was taken before.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            shard.generation += 1;
            shard.users = HashMap::new();
        }
    }

    fn insert(&self, shard: &mut Shard, id: UserId, user: Arc<User>) {
        if self.per_shard == 0 {
            return;
        }
        if shard.users.len() >= self.per_shard && !shard.users.contains_key(&id) {
            // The map's order is randomly seeded: an arbitrary victim, found at once.
            if let Some(&victim) = shard.users.keys().next() {
                shard.users.remove(&victim);
            }
        }
        shard.users.insert(id, user);
    }

    /// The user `id` as the store has it: from the cache, or read from `store` (and
    /// kept, under the rule of [`fill`](Self::fill)). Shared, not copied: a hit
    /// allocates nothing.
    pub fn load(
        &self,
        store: &dyn ReadStore,
        id: UserId,
    ) -> Result<Option<Arc<User>>, StorageError> {
        let ticket = match self.lookup(id) {
            Lookup::Hit(user) => return Ok(Some(user)),
            Lookup::Miss(ticket) => ticket,
        };
        let Some(user) = super::load(store, id)? else {
            return Ok(None);
        };
        let user = Arc::new(user);
        self.fill(ticket, &user);
        Ok(Some(user))
    }
}

/// What [`UserCache::fetch`] found: the cached user, or the store's read under way.
pub enum Fetch {
    Hit(Arc<User>),
    /// Resolves to the user as the store has it (`None`: no such user), offered to
    /// the cache under the rule of [`fill`](UserCache::fill).
    Read(StoreFuture<Option<Arc<User>>>),
}

impl UserCache {
    /// The request path's form of [`load`](Self::load): a hit at once, or on a miss
    /// the store's [`AuthStore::user`] as a future (PostgreSQL: run on the store's
    /// runtime; the caller awaits it instead of blocking its thread).
    pub fn fetch(self: &Arc<Self>, model: &dyn AuthStore, id: UserId) -> Fetch {
        let ticket = match self.lookup(id) {
            Lookup::Hit(user) => return Fetch::Hit(user),
            Lookup::Miss(ticket) => ticket,
        };
        let read = model.user(id);
        let cache = self.clone();
        Fetch::Read(Box::pin(async move {
            let Some(user) = read.await? else {
                return Ok(None);
            };
            let user = Arc::new(user);
            cache.fill(ticket, &user);
            Ok(Some(user))
        }))
    }
}

// A panic while a shard is held leaves a map that is still whole (every change to
// it is one call): go on with it.
fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    shard
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    shard
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SessionKey;
    use crate::storage::{Tree, Visitor};
    use std::sync::Mutex;

    fn user(id: UserId, stamp: u64) -> User {
        let mut user = User::new(id, "wxa", &format!("o-{id}"), None, SessionKey::new("k"), 1);
        user.token_stamp = stamp;
        user
    }

    fn stamp_of(cache: &UserCache, id: UserId) -> Option<u64> {
        match cache.lookup(id) {
            Lookup::Hit(user) => Some(user.token_stamp),
            Lookup::Miss(_) => None,
        }
    }

    fn ticket(cache: &UserCache, id: UserId) -> Ticket {
        match cache.lookup(id) {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("user {id} is cached"),
        }
    }

    #[test]
    fn a_miss_is_filled_and_then_hits() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        let t = ticket(&cache, 7);
        cache.fill(t, &Arc::new(user(7, 0)));
        assert_eq!(stamp_of(&cache, 7), Some(0));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_read_from_before_a_write_is_not_kept_after_the_write() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        // Reader: misses, reads the old record from the store...
        let t = ticket(&cache, 7);
        let old = Arc::new(user(7, 0));
        // ...the registry writes the new one (a revoke) and puts it...
        cache.put(user(7, 1));
        // ...the reader's late fill does not overwrite it.
        cache.fill(t, &old);
        assert_eq!(stamp_of(&cache, 7), Some(1));
    }

    #[test]
    fn a_read_from_before_a_write_is_not_kept_even_after_an_eviction() {
        // One entry per shard: every other put into the shard evicts.
        let cache = UserCache::new(SHARDS);
        let t = ticket(&cache, 7);
        let old = Arc::new(user(7, 0));
        cache.put(user(7, 1));
        // Another user of the same shard pushes 7 out.
        let neighbour = 7 + SHARDS as u64;
        cache.put(user(neighbour, 0));
        assert_eq!(stamp_of(&cache, 7), None, "evicted");
        // The stale read would land in an empty slot: the generation refuses it.
        cache.fill(t, &old);
        assert_eq!(stamp_of(&cache, 7), None);
        // A read that starts now sees the new record, and is kept.
        let t = ticket(&cache, 7);
        cache.fill(t, &Arc::new(user(7, 1)));
        assert_eq!(stamp_of(&cache, 7), Some(1));
    }

    #[test]
    fn a_write_to_another_shard_does_not_refuse_a_fill() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        let t = ticket(&cache, 7);
        cache.put(user(8, 0));
        cache.fill(t, &Arc::new(user(7, 0)));
        assert_eq!(stamp_of(&cache, 7), Some(0));
    }

    #[test]
    fn a_fill_never_replaces_an_entry() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        let first = ticket(&cache, 7);
        let second = ticket(&cache, 7);
        cache.fill(first, &Arc::new(user(7, 0)));
        // Same generation, but the entry is there (perhaps put by the registry since).
        cache.fill(second, &Arc::new(user(7, 5)));
        assert_eq!(stamp_of(&cache, 7), Some(0));
    }

    #[test]
    fn a_clear_empties_and_refuses_reads_from_before_it() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        cache.put(user(1, 0));
        let t = ticket(&cache, 7);
        cache.clear();
        assert!(cache.is_empty());
        // Read from the store as it was before it reopened: not kept.
        cache.fill(t, &Arc::new(user(7, 0)));
        assert_eq!(stamp_of(&cache, 7), None);
    }

    #[test]
    fn a_lost_channel_serves_entries_for_the_bound_then_none_until_trusted_again() {
        let cache = UserCache::new(DEFAULT_CAPACITY);
        cache.put(user(1, 0));
        assert!(cache.distrust_after(Duration::from_secs(3600)));
        assert!(!cache.distrust_after(Duration::ZERO), "the first end stays");
        assert_eq!(stamp_of(&cache, 1), Some(0), "within the bound");
        let t = ticket(&cache, 2);
        cache.fill(t, &Arc::new(user(2, 0)));
        assert_eq!(stamp_of(&cache, 2), Some(0), "a fresh read is kept");

        let cache = UserCache::new(DEFAULT_CAPACITY);
        cache.put(user(1, 0));
        assert!(cache.distrust_after(Duration::ZERO));
        assert_eq!(stamp_of(&cache, 1), None, "past the bound: a miss");
        let t = ticket(&cache, 2);
        cache.fill(t, &Arc::new(user(2, 0)));
        assert_eq!(stamp_of(&cache, 2), None, "and nothing is kept");
        cache.trust();
        assert!(cache.is_empty(), "emptied when trusted again");
        let t = ticket(&cache, 1);
        cache.fill(t, &Arc::new(user(1, 1)));
        assert_eq!(stamp_of(&cache, 1), Some(1));
    }

    #[test]
    fn the_entry_count_stays_bounded_at_a_million_users() {
        let cache = UserCache::new(1_000);
        assert_eq!(cache.capacity(), 1_024);
        for id in 1..=1_000_000u64 {
            if id % 2 == 0 {
                cache.put(user(id, 0));
            } else {
                let t = ticket(&cache, id);
                cache.fill(t, &Arc::new(user(id, 0)));
            }
        }
        assert_eq!(cache.len(), cache.capacity());
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let cache = UserCache::new(0);
        cache.put(user(7, 0));
        let t = ticket(&cache, 7);
        cache.fill(t, &Arc::new(user(7, 0)));
        assert!(cache.is_empty());
    }

    /// A store whose users tree is a map, that can run something in the middle of
    /// a read (a write racing the reader).
    #[derive(Default)]
    struct RacyStore {
        users: Mutex<HashMap<UserId, Vec<u8>>>,
        during_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl ReadStore for RacyStore {
        fn get(&self, _: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            let id = UserId::from_be_bytes(key.try_into().unwrap());
            let value = self.users.lock().unwrap().get(&id).cloned();
            // The registry's write lands after this read, before the reader fills.
            if let Some(during) = self.during_read.lock().unwrap().take() {
                during();
            }
            Ok(value)
        }
        fn for_each(&self, _: Tree, _: &mut Visitor<'_>) -> Result<(), StorageError> {
            Ok(())
        }
        fn size_on_disk(&self) -> Result<u64, StorageError> {
            Ok(0)
        }
    }

    #[test]
    fn load_does_not_cache_a_record_overwritten_while_it_read() {
        let store = Arc::new(RacyStore::default());
        // One entry per shard, so that a put of a neighbour evicts.
        let cache = Arc::new(UserCache::new(SHARDS));
        store
            .users
            .lock()
            .unwrap()
            .insert(7, super::super::encode(&user(7, 0)));
        let (writer_store, writer_cache) = (store.clone(), cache.clone());
        *store.during_read.lock().unwrap() = Some(Box::new(move || {
            // What the registry does: apply, then put. Then the put is evicted.
            let revoked = user(7, 1);
            writer_store
                .users
                .lock()
                .unwrap()
                .insert(7, super::super::encode(&revoked));
            writer_cache.put(revoked);
            writer_cache.put(user(7 + SHARDS as u64, 0));
        }));
        let read = cache.load(store.as_ref(), 7).unwrap().unwrap();
        assert_eq!(read.token_stamp, 0, "the reader saw the old record");
        assert_eq!(stamp_of(&cache, 7), None, "and did not cache it");
        let read = cache.load(store.as_ref(), 7).unwrap().unwrap();
        assert_eq!(read.token_stamp, 1);
        assert_eq!(stamp_of(&cache, 7), Some(1));
        assert!(cache.load(store.as_ref(), 8).unwrap().is_none());
        assert_eq!(stamp_of(&cache, 8), None, "absence is not cached");
    }
}
