//! Cross-node invalidation of the users cache: every change of a user row is
//! announced with `NOTIFY wxauth_users, '<id>'` in its own transaction (delivered on
//! commit), and every node listens on one connection of its own and drops that user
//! from its cache. A node that is not listening cannot know what changed: when the
//! connection drops (it closes, or a heartbeat goes unanswered), the cached users are
//! served for `storage.postgres_stale_for` more at most, then not at all; once
//! `LISTEN` is back the cache is emptied (whatever it holds may predate a change
//! nobody told us about) and trusted again. The rule: docs/SCALING.md, "When the
//! database does not answer".

use super::{IoRuntime, USERS_CHANNEL};
use crate::users::cache::UserCache;
use crate::users::UserId;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How often the listener checks that its connection still answers, and how long it
/// waits for the answer: a database that stops answering without closing the
/// connection (a cut link) is noticed within the two.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the listener on the store's runtime; it runs until the runtime stops.
pub(super) fn start(
    io: &IoRuntime,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    cache: Arc<UserCache>,
    stale_for: Duration,
) {
    io.handle.spawn(async move {
        let mut announced_loss = false;
        loop {
            let lost = listen(&config, tls.clone(), &cache).await;
            let bound_set = cache.distrust_after(stale_for);
            let stale_ms = stale_for.as_millis() as u64;
            match lost {
                Ok(()) => {
                    tracing::warn!(stale_ms, "lost the PostgreSQL notification connection: cached users are served for storage.postgres_stale_for at most, then read from the database");
                    announced_loss = false;
                }
                Err(e) => {
                    if !announced_loss || bound_set {
                        tracing::warn!(error = %crate::cause::cause_chain(&e), stale_ms, "cannot listen for user changes on PostgreSQL: cached users are served for storage.postgres_stale_for at most; retrying");
                        announced_loss = true;
                    }
                }
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    });
}

/// One connection's life: `LISTEN`, empty and trust the cache, then forget each user
/// announced, until the connection ends or stops answering (`Ok`) or cannot be made
/// (`Err`).
async fn listen(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    cache: &Arc<UserCache>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let forgetting = cache.clone();
    let mut driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Ok(id) = n.payload().parse::<UserId>() {
                        forgetting.forget(id);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {USERS_CHANNEL}"))
        .await?;
    cache.trust();
    tracing::debug!("subscribed to user changes on PostgreSQL");
    loop {
        tokio::select! {
            _ = &mut driver => break,
            () = tokio::time::sleep(HEARTBEAT) => {
                // An answer shows that the connection still carries notifications;
                // none within the timeout, and it is treated as lost.
                let answered = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("")).await;
                if !matches!(answered, Ok(Ok(_))) {
                    tracing::debug!("the PostgreSQL notification connection did not answer its heartbeat");
                    break;
                }
            }
        }
    }
    drop(client);
    driver.abort();
    Ok(())
}
