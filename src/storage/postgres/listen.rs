//! Cross-node invalidation of the users cache: every change of a user row is
//! announced with `NOTIFY wxauth_users, '<id>'` in its own transaction (delivered on
//! commit), and every node listens on one connection of its own and drops that user
//! from its cache. A node that is not listening cannot know what changed: when the
//! connection drops, the cache is emptied, and emptied again once `LISTEN` is back
//! (whatever was read in between may predate a change nobody told us about).

use super::{IoRuntime, USERS_CHANNEL};
use crate::users::cache::UserCache;
use crate::users::UserId;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// Starts the listener on the store's runtime; it runs until the runtime stops.
pub(super) fn start(
    io: &IoRuntime,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    cache: Arc<UserCache>,
) {
    io.handle.spawn(async move {
        let mut announced_loss = false;
        loop {
            match listen(&config, tls.clone(), &cache).await {
                Ok(()) => {
                    tracing::warn!("lost the PostgreSQL notification connection: users cache emptied");
                    announced_loss = false;
                }
                Err(e) => {
                    if !announced_loss {
                        tracing::warn!(error = %crate::cause::cause_chain(&e), "cannot listen for user changes on PostgreSQL: users cache emptied; retrying");
                        announced_loss = true;
                    }
                }
            }
            cache.clear();
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    });
}

/// One connection's life: `LISTEN`, empty the cache, then forget each user announced,
/// until the connection ends (`Ok`) or cannot be made (`Err`).
async fn listen(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    cache: &Arc<UserCache>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let forgetting = cache.clone();
    let driver = tokio::spawn(async move {
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
    cache.clear();
    tracing::debug!("subscribed to user changes on PostgreSQL");
    let _ = driver.await;
    drop(client);
    Ok(())
}
