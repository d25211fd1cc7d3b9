//! The commands themselves, run the same way by the server and by the CLI on its own.

use super::protocol::{write_line, Request};
use super::{backup, AdminError};
use crate::actors::access_token::{self, AccessTokenKeeper, CheckSession};
use crate::actors::issuer::TokenIssuer;
use crate::actors::registry::{DeleteUser, RevokeTokens, SetDisabled, UserRegistry};
use crate::config::JwtConfig;
use crate::storage::model::{AuthStore, Deletion, FamilyRecord};
use crate::storage::{GroupCommit, ReadStore, Store, Tree};
use crate::tokens::JwtKeys;
use crate::users::{self, User, UserId};
use actix::Addr;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The operator's view of a user: everything but the session key.
pub fn user_view(user: &User) -> Value {
    json!({
        "id": user.id,
        "appid": user.appid,
        "openid": (!user.openid.is_empty()).then_some(&user.openid),
        "unionid": user.unionid,
        "created_at": crate::clock::rfc3339(user.created_at),
        "last_login_at": crate::clock::rfc3339(user.last_login_at),
        "disabled": user.disabled,
        "phone_number": user.phone.as_ref().map(|p| &p.phone_number),
        "pure_phone_number": user.phone.as_ref().map(|p| &p.pure_phone_number),
        "country_code": user.phone.as_ref().map(|p| &p.country_code),
        "nickname": user.nickname,
        "avatar_url": user.avatar_url,
        "deletion_scheduled_at": user.deletion_due.map(crate::clock::rfc3339),
        "erased_at": user.erased_at.map(crate::clock::rfc3339),
    })
}

/// Where a command's writes go.
pub enum WriteTarget {
    /// Through the running server's owner actors, then its group commit.
    Server {
        registry: Addr<UserRegistry>,
        issuer: Addr<TokenIssuer>,
        keeper: AccessTokenKeeper,
        commit: GroupCommit,
        runtime: tokio::runtime::Handle,
        keys: Arc<JwtKeys>,
        /// The event records' writer once written (embedded store, events on).
        delivery_thread: Option<crate::events::DeliveryThread>,
    },
    /// Straight into the data directory (no server holds it), durable at once.
    Direct {
        model: Arc<dyn AuthStore>,
        /// Waits for the model's futures (they resolve once durable).
        runtime: tokio::runtime::Runtime,
        /// Keys are loaded only by the `keys` commands: listing users needs no key file.
        jwt: Box<JwtConfig>,
        /// `users.deletion_delay`.
        deletion_delay: std::time::Duration,
        /// PostgreSQL's outbox, which every node delivers from while this runs.
        shared_outbox: Option<Arc<dyn crate::events::SharedOutbox>>,
    },
}

fn mailbox(e: actix::MailboxError) -> AdminError {
    AdminError::Server(format!("the server is shutting down ({e})"))
}

impl WriteTarget {
    /// The server's live key set, or the data directory's when no server runs.
    fn keys(&self, data_dir: &Path) -> Result<Arc<JwtKeys>, AdminError> {
        match self {
            WriteTarget::Server { keys, .. } => Ok(keys.clone()),
            WriteTarget::Direct { jwt, .. } => JwtKeys::load(jwt, data_dir)
                .map(Arc::new)
                .map_err(|e| AdminError::Refused(e.to_string())),
        }
    }

    fn set_disabled(&mut self, id: UserId, disabled: bool) -> Result<Option<User>, AdminError> {
        match self {
            WriteTarget::Server {
                registry,
                commit,
                runtime,
                ..
            } => runtime.block_on(async {
                let user = registry
                    .send(SetDisabled {
                        user_id: id,
                        disabled,
                    })
                    .await
                    .map_err(mailbox)??;
                commit.durable().await?;
                Ok(user)
            }),
            WriteTarget::Direct { model, runtime, .. } => {
                Ok(runtime.block_on(model.set_disabled(id, disabled))?)
            }
        }
    }

    /// Asks WeChat (with the server's access token) whether it holds `user`'s
    /// session key. Only through the running server: a second process fetching a
    /// token of its own is what the keeper exists to prevent.
    fn check_session(&mut self, user: &User) -> Result<bool, AdminError> {
        match self {
            WriteTarget::Server {
                keeper, runtime, ..
            } => runtime.block_on(async {
                keeper
                    .check_session(CheckSession {
                        appid: user.appid.clone(),
                        openid: user.openid.clone(),
                        signature: crate::wechat_crypto::checksession_signature(
                            user.session_key.expose(),
                        ),
                    })
                    .await
                    .map_err(|e| AdminError::Server(format!("WeChat: {e}")))
            }),
            WriteTarget::Direct { .. } => Err(AdminError::Refused(
                "check-session needs the running server (it holds WeChat's access token): start it first".into(),
            )),
        }
    }

    /// Deletes the account as `DeleteUser` does (the registry applies the delay).
    fn delete_user(&mut self, id: UserId, at_once: bool) -> Result<Option<Deletion>, AdminError> {
        match self {
            WriteTarget::Server {
                registry, runtime, ..
            } => runtime.block_on(async {
                Ok(registry
                    .send(DeleteUser {
                        user_id: id,
                        at_once,
                    })
                    .await
                    .map_err(mailbox)??)
            }),
            WriteTarget::Direct {
                model,
                runtime,
                deletion_delay,
                ..
            } => {
                let now = crate::clock::now_unix();
                let delay = i64::try_from(deletion_delay.as_secs()).unwrap_or(i64::MAX);
                let due = if at_once {
                    now
                } else {
                    now.saturating_add(delay)
                };
                Ok(runtime.block_on(model.delete_user(id, due, now, false))?)
            }
        }
    }

    /// Bumps the user's token stamp: every token issued so far, on every path, is
    /// refused (no family is written: the stamp already refuses their tokens).
    fn revoke_tokens(&mut self, id: UserId) -> Result<Option<User>, AdminError> {
        match self {
            WriteTarget::Server {
                registry, runtime, ..
            } => runtime.block_on(async {
                Ok(registry
                    .send(RevokeTokens { user_id: id })
                    .await
                    .map_err(mailbox)??)
            }),
            WriteTarget::Direct { model, runtime, .. } => {
                Ok(runtime.block_on(model.revoke_tokens(id))?)
            }
        }
    }

    /// `wxauth events retry`, by whoever writes the event records: a running
    /// node's delivery thread, PostgreSQL's conditional statement, or (no server,
    /// or events off) this process. The count.
    fn retry_events(&mut self, store: &dyn Store) -> Result<usize, AdminError> {
        let retried = match self {
            WriteTarget::Server {
                delivery_thread: Some(thread),
                ..
            } => thread.retry(),
            WriteTarget::Direct {
                shared_outbox: Some(outbox),
                ..
            } => outbox.retry_all(),
            _ => crate::events::retry_all(store),
        };
        Ok(retried?)
    }
}

/// The operator's view of one family (a login's session) of `user`.
fn session_view(family: &FamilyRecord, user: &User, now: i64) -> Value {
    json!({
        "family": family.id.to_hex(),
        "created_at": crate::clock::rfc3339(family.created_ms.div_euclid(1000)),
        "last_rotated_at": crate::clock::rfc3339(family.rotated_ms.div_euclid(1000)),
        "expires_at": crate::clock::rfc3339(family.exp),
        "generation": family.generation,
        "revoked": family.is_revoked(),
        "active": family.is_live(user.token_stamp, now),
    })
}

/// How many of the user's families could still refresh. `None`: no such user.
fn live_families(store: &dyn ReadStore, id: UserId) -> Result<Option<usize>, AdminError> {
    let Some(user) = users::load(store, id)? else {
        return Ok(None);
    };
    let now = crate::clock::now_unix();
    Ok(Some(
        crate::storage::sled_model::user_families(store, id)?
            .iter()
            .filter(|family| family.is_live(user.token_stamp, now))
            .count(),
    ))
}

/// Runs one request, writing its output as JSON lines to `out`. Reads (and the
/// backup's snapshot) use `store` directly; writes go through `writes`.
pub fn execute(
    request: &Request,
    store: &dyn Store,
    data_dir: &Path,
    writes: &mut WriteTarget,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match *request {
        Request::UsersList => {
            let mut result = Ok(());
            store.for_each(Tree::Users, &mut |_, value| {
                result = users::decode(value)
                    .map_err(AdminError::from)
                    .and_then(|user| Ok(write_line(out, &user_view(&user))?));
                if result.is_ok() {
                    std::ops::ControlFlow::Continue(())
                } else {
                    std::ops::ControlFlow::Break(())
                }
            })?;
            result
        }
        Request::UsersSessions { id } => {
            let user = users::load(store, id)?.ok_or(AdminError::NoSuchUser(id))?;
            let now = crate::clock::now_unix();
            for family in crate::storage::sled_model::user_families(store, id)? {
                write_line(out, &session_view(&family, &user, now))?;
            }
            Ok(())
        }
        Request::UsersExport { id } => {
            let user = users::load(store, id)?.ok_or(AdminError::NoSuchUser(id))?;
            let families = crate::storage::sled_model::user_families(store, id)?;
            let view = users::export::export(&user, &families, crate::clock::now_unix());
            Ok(write_line(out, &view)?)
        }
        Request::UsersDelete { id, now } => {
            let line = match writes.delete_user(id, now)? {
                None => return Err(AdminError::NoSuchUser(id)),
                Some(Deletion::Scheduled { due, .. }) => json!({
                    "user_id": id,
                    "deletion_scheduled_at": crate::clock::rfc3339(due),
                }),
                Some(Deletion::Erased { user }) => json!({
                    "user_id": id,
                    "erased_at": user.erased_at.map(crate::clock::rfc3339),
                }),
            };
            Ok(write_line(out, &line)?)
        }
        Request::EventsList => {
            for (seq, event) in crate::events::pending(store, usize::MAX)? {
                write_line(out, &event.view(seq))?;
            }
            Ok(())
        }
        Request::EventsRetry => {
            let count = writes.retry_events(store)?;
            Ok(write_line(out, &json!({ "events_due_now": count }))?)
        }
        Request::UsersShow { id } => {
            let user = users::load(store, id)?.ok_or(AdminError::NoSuchUser(id))?;
            Ok(write_line(out, &user_view(&user))?)
        }
        Request::UsersSetDisabled { id, disabled } => {
            let user = writes
                .set_disabled(id, disabled)?
                .ok_or(AdminError::NoSuchUser(id))?;
            Ok(write_line(out, &user_view(&user))?)
        }
        Request::TokensRevoke { user } => {
            // What the new stamp ends: the sessions that could still refresh.
            let families = live_families(store, user)?.unwrap_or(0);
            writes
                .revoke_tokens(user)?
                .ok_or(AdminError::NoSuchUser(user))?;
            Ok(write_line(
                out,
                &json!({ "user_id": user, "families_revoked": families }),
            )?)
        }
        Request::WechatToken { ref appid } => {
            let appids = match appid {
                Some(appid) => vec![appid.clone()],
                None => access_token::stored_appids(store)?,
            };
            for appid in appids {
                let status = access_token::status(store, &appid)?;
                write_line(out, &json!(status))?;
            }
            Ok(())
        }
        Request::UsersCheckSession { id } => {
            let user = users::load(store, id)?.ok_or(AdminError::NoSuchUser(id))?;
            let held = writes.check_session(&user)?;
            Ok(write_line(
                out,
                &json!({ "user_id": id, "appid": user.appid, "session_key_valid": held }),
            )?)
        }
        Request::Backup => match writes {
            // The server's writers wait only while the snapshot is written to disk.
            WriteTarget::Server { .. } => backup::spooled_backup(store, data_dir, out),
            // No server: nobody waits, and `out` is the operator's file already.
            WriteTarget::Direct { .. } => backup::backup(store, data_dir, out),
        },
        Request::KeysList => {
            for key in writes.keys(data_dir)?.list() {
                write_line(out, &key)?;
            }
            Ok(())
        }
        Request::KeysRotate { ref key } => {
            let made = writes.keys(data_dir)?.rotate(key.as_ref())?;
            Ok(write_line(out, &made)?)
        }
        Request::KeysActivate { ref kid } => {
            let active = writes.keys(data_dir)?.activate(kid)?;
            Ok(write_line(out, &active)?)
        }
        Request::KeysRetire { ref kid } => {
            writes.keys(data_dir)?.retire(kid)?;
            Ok(write_line(out, &json!({ "retired": kid }))?)
        }
    }
}
