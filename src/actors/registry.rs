//! The user registry: the owner of the user operations (`storage::model`), and
//! where a login is recorded whole.
//!
//! Find-or-create runs as one store operation asked in this actor's turn: with
//! sled, one message at a time, so 64 concurrent logins of one new openid create
//! one user; with a database, its unique key decides. A login's user writes and its
//! new family are one durable unit, and `Login` answers once it is durable. The
//! operator's messages and `SetPhone` answer once their write is durable too.

use crate::storage::model::{
    AuthStore, Deletion, FamilyId, LoginRequest, LoginResult, ProfileChange, StartFamilyRequest,
    StartFamilyResult,
};
use crate::storage::{StorageError, Store, Tree, WriteBatch};
use crate::tokens::issue::{self, TokenPair};
use crate::tokens::JwtKeys;
use crate::users::{self, User, UserId};
use crate::wechat::Session;
use actix::prelude::*;
use std::sync::Arc;

pub struct UserRegistry {
    model: Arc<dyn AuthStore>,
    /// For the readiness probe's write only.
    store: Arc<dyn Store>,
    link_by_unionid: bool,
    /// `users.deletion_delay`, in seconds.
    deletion_delay: i64,
}

/// How often the registry looks for accounts whose deletion is due, and how many
/// it erases per look.
const DELETION_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);
const DELETION_SWEEP_LIMIT: usize = 100;

impl UserRegistry {
    pub fn new(model: Arc<dyn AuthStore>, store: Arc<dyn Store>, link_by_unionid: bool) -> Self {
        UserRegistry {
            model,
            store,
            link_by_unionid,
            deletion_delay: 0,
        }
    }

    /// `users.deletion_delay`.
    pub fn with_deletion_delay(mut self, delay: std::time::Duration) -> Self {
        self.deletion_delay = i64::try_from(delay.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Erases the accounts whose deletion is due (one bounded step; the marks are
    /// in the store, so a restart picks up where this left off).
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let now = crate::clock::now_unix();
        let due = self.model.due_deletions(now, DELETION_SWEEP_LIMIT);
        let model = self.model.clone();
        let erase = async move {
            for id in due.await? {
                if let Some(Deletion::Erased { .. }) = model.delete_user(id, now, now, true).await?
                {
                    tracing::info!(user_id = id, "account erased (deletion due)");
                }
            }
            Ok::<(), StorageError>(())
        };
        ctx.spawn(
            async move {
                if let Err(e) = erase.await {
                    tracing::warn!(error = %e, "the deletion sweep failed; retried");
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for UserRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(DELETION_SWEEP, |registry, ctx| registry.sweep(ctx));
    }
}

/// Find or create the user for this WeChat session, record the login, and start
/// its token family: one durable unit. The tokens are signed once it is durable.
#[derive(Message)]
#[rtype(result = "Result<LoginOutcome, StorageError>")]
pub struct Login {
    pub appid: String,
    pub session: Session,
    /// The keys the login's tokens are signed with (the server's shared set).
    pub keys: Arc<JwtKeys>,
    /// The request's span (its request id): the handler's log lines carry it.
    pub span: tracing::Span,
}

/// Not boxed: it lives for one answer, and the common case is the large variant.
#[allow(clippy::large_enum_variant)]
pub enum LoginOutcome {
    LoggedIn {
        user: User,
        created: bool,
        /// The account was marked for deletion: this login cancelled it.
        deletion_cancelled: bool,
        /// Boxed: the signed tokens and their claims make this variant large.
        pair: Box<TokenPair>,
    },
    Disabled,
}

impl Handler<Login> for UserRegistry {
    type Result = ResponseFuture<Result<LoginOutcome, StorageError>>;

    fn handle(&mut self, msg: Login, _: &mut Context<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        let now_ms = crate::clock::now_ms();
        let now = now_ms.div_euclid(1000);
        let keys = msg.keys;
        let login = self.model.login(LoginRequest {
            appid: msg.appid,
            session: msg.session,
            link_by_unionid: self.link_by_unionid,
            family: FamilyId::random(),
            family_exp: now.saturating_add(keys.refresh_ttl),
            now_ms,
        });
        Box::pin(async move {
            Ok(match login.await? {
                LoginResult::LoggedIn {
                    user,
                    created,
                    family,
                    deletion_cancelled,
                } => {
                    // The stamp read in the login itself: a revoke lands wholly
                    // before or after it.
                    let pair = issue::pair(&keys, &user, &family, now);
                    LoginOutcome::LoggedIn {
                        user,
                        created,
                        deletion_cancelled,
                        pair: Box::new(pair),
                    }
                }
                LoginResult::Disabled => LoginOutcome::Disabled,
            })
        })
    }
}

/// A new session (family and token pair) for an existing, enabled user: the web
/// login's confirm. Answered once the family is durable; the tokens are signed
/// after that.
#[derive(Message)]
#[rtype(result = "Result<SessionOutcome, StorageError>")]
pub struct StartSession {
    pub user_id: UserId,
    pub keys: Arc<JwtKeys>,
    pub span: tracing::Span,
}

#[allow(clippy::large_enum_variant)]
pub enum SessionOutcome {
    Started { user: User, pair: Box<TokenPair> },
    Disabled,
    Missing,
}

impl Handler<StartSession> for UserRegistry {
    type Result = ResponseFuture<Result<SessionOutcome, StorageError>>;

    fn handle(&mut self, msg: StartSession, _: &mut Context<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        let now_ms = crate::clock::now_ms();
        let now = now_ms.div_euclid(1000);
        let keys = msg.keys;
        let started = self.model.start_family(StartFamilyRequest {
            user_id: msg.user_id,
            family: FamilyId::random(),
            family_exp: now.saturating_add(keys.refresh_ttl),
            now_ms,
        });
        Box::pin(async move {
            Ok(match started.await? {
                StartFamilyResult::Started { user, family } => {
                    let pair = issue::pair(&keys, &user, &family, now);
                    SessionOutcome::Started {
                        user,
                        pair: Box::new(pair),
                    }
                }
                StartFamilyResult::Disabled => SessionOutcome::Disabled,
                StartFamilyResult::Missing => SessionOutcome::Missing,
            })
        })
    }
}

/// Readiness probe: a tiny write through the owner, so that the caller can wait
/// for it to reach the disk.
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct Probe;

impl Handler<Probe> for UserRegistry {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, _: Probe, _: &mut Context<Self>) -> Self::Result {
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::Meta,
            b"last_probe".as_slice(),
            crate::clock::now_unix().to_be_bytes(),
        );
        self.store.apply(batch)
    }
}

type UserAnswer = ResponseFuture<Result<Option<User>, StorageError>>;

/// Records the phone number WeChat gave for a user. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct SetPhone {
    pub user_id: UserId,
    pub phone: users::PhoneNumber,
}

impl Handler<SetPhone> for UserRegistry {
    type Result = UserAnswer;

    fn handle(&mut self, msg: SetPhone, _: &mut Context<Self>) -> Self::Result {
        self.model.set_phone(msg.user_id, msg.phone)
    }
}

/// Operator: disable or enable a user: its logins, refreshes and access tokens are
/// refused from the next request on (they all read the user record). Durable on
/// return.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct SetDisabled {
    pub user_id: UserId,
    pub disabled: bool,
}

impl Handler<SetDisabled> for UserRegistry {
    type Result = UserAnswer;

    fn handle(&mut self, msg: SetDisabled, _: &mut Context<Self>) -> Self::Result {
        self.model.set_disabled(msg.user_id, msg.disabled)
    }
}

/// Operator: revoke every token issued to a user so far (the user's token stamp:
/// every older token, access or refresh, is refused on every path). Durable on
/// return.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct RevokeTokens {
    pub user_id: UserId,
}

impl Handler<RevokeTokens> for UserRegistry {
    type Result = UserAnswer;

    fn handle(&mut self, msg: RevokeTokens, _: &mut Context<Self>) -> Self::Result {
        self.model.revoke_tokens(msg.user_id)
    }
}

/// `PATCH /api/weixin/user/`: the profile fields given replace the stored ones.
/// Durable on return; `None`: no such user.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct SetProfile {
    pub user_id: UserId,
    pub change: ProfileChange,
}

impl Handler<SetProfile> for UserRegistry {
    type Result = UserAnswer;

    fn handle(&mut self, msg: SetProfile, _: &mut Context<Self>) -> Self::Result {
        self.model.set_profile(msg.user_id, msg.change)
    }
}

/// Deletes an account: marked for `users.deletion_delay` (a login cancels it), or
/// erased at once when the delay is 0 or `at_once` (the operator's `--now`).
/// Durable on return; `None`: no such user, or erased already.
#[derive(Message)]
#[rtype(result = "Result<Option<Deletion>, StorageError>")]
pub struct DeleteUser {
    pub user_id: UserId,
    pub at_once: bool,
}

impl Handler<DeleteUser> for UserRegistry {
    type Result = ResponseFuture<Result<Option<Deletion>, StorageError>>;

    fn handle(&mut self, msg: DeleteUser, _: &mut Context<Self>) -> Self::Result {
        let now = crate::clock::now_unix();
        let due = if msg.at_once {
            now
        } else {
            now.saturating_add(self.deletion_delay)
        };
        self.model.delete_user(msg.user_id, due, now, false)
    }
}
