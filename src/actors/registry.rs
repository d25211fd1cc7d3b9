//! The user registry: the only writer of the user trees, and where a login is
//! recorded whole.
//!
//! Find-or-create runs inside this actor, one message at a time, so 64 concurrent
//! logins of one new openid create one user. A login's user writes and its new
//! token family (`tokens::issue::start_family`) go in one batch, applied atomically,
//! and `Login` answers once the group commit has made it durable. The operator's
//! messages and `SetPhone` do not wait for the fsync: whoever sent them waits for the
//! group commit after its last write (see `storage`).

use crate::actors::wechat::Session;
use crate::storage::{GroupCommit, StorageError, Store, Tree, WriteBatch};
use crate::tokens::issue::{self, TokenPair};
use crate::tokens::JwtKeys;
use crate::users::cache::{self, UserCache};
use crate::users::{self, User, UserId, NEXT_USER_ID_KEY};
use actix::prelude::*;
use std::sync::Arc;

pub struct UserRegistry {
    store: Arc<dyn Store>,
    link_by_unionid: bool,
    next_id: UserId,
    /// The token check's decoded users: every user record written here is put
    /// there once applied (see `users::cache` for why that keeps it exact).
    users: Arc<UserCache>,
}

impl UserRegistry {
    pub fn new(store: Arc<dyn Store>, link_by_unionid: bool) -> Result<Self, StorageError> {
        let next_id = match store.get(Tree::Meta, NEXT_USER_ID_KEY)? {
            Some(bytes) => users::decode_id(Tree::Meta, &bytes)?,
            None => 1,
        };
        Ok(UserRegistry {
            store,
            link_by_unionid,
            next_id,
            users: Arc::new(UserCache::new(cache::DEFAULT_CAPACITY)),
        })
    }

    /// The cache this registry keeps up to date, for the token check to read.
    pub fn user_cache(&self) -> Arc<UserCache> {
        self.users.clone()
    }

    /// The user this session belongs to, and whether this app's openid already
    /// points at it (a user found through its unionid may be new to this app).
    fn find(&self, appid: &str, session: &Session) -> Result<Option<(User, bool)>, StorageError> {
        let store = self.store.as_ref();
        let openid_key = users::openid_key(appid, &session.openid);
        let by_openid = users::lookup(store, Tree::UsersByOpenid, &openid_key)?;
        let mut id = by_openid;
        if self.link_by_unionid {
            if let Some(unionid) = &session.unionid {
                id = users::lookup(store, Tree::UsersByUnionid, unionid.as_bytes())?.or(id);
            }
        }
        let Some(id) = id else { return Ok(None) };
        let user = users::load(store, id)?.ok_or_else(|| StorageError::Corrupt {
            tree: Tree::Users.name(),
            reason: format!("index points at missing user {id}"),
        })?;
        Ok(Some((user, by_openid == Some(id))))
    }

    fn login(&mut self, msg: Login) -> Result<LoginOutcome, StorageError> {
        let now = crate::now_unix();
        let mut batch = WriteBatch::default();
        let (user, created) = match self.find(&msg.appid, &msg.session)? {
            Some((user, _)) if user.disabled => return Ok(LoginOutcome::Disabled),
            Some((mut user, openid_indexed)) => {
                user.last_login_at = now;
                user.session_key = msg.session.session_key.clone();
                if user.unionid.is_none() {
                    user.unionid = msg.session.unionid.clone();
                }
                // A linked user logging in through another app gets that app's openid too.
                // (Usually it is there already: then a returning login is one write.)
                if !openid_indexed {
                    batch.put(
                        Tree::UsersByOpenid,
                        users::openid_key(&msg.appid, &msg.session.openid),
                        users::id_key(user.id),
                    );
                }
                // A user created before WeChat sent a unionid (or before linking was
                // turned on) is indexed by it now, so the next app finds them.
                if let (true, Some(unionid)) = (self.link_by_unionid, &msg.session.unionid) {
                    if users::lookup(
                        self.store.as_ref(),
                        Tree::UsersByUnionid,
                        unionid.as_bytes(),
                    )?
                    .is_none()
                    {
                        batch.put(
                            Tree::UsersByUnionid,
                            unionid.as_bytes(),
                            users::id_key(user.id),
                        );
                    }
                }
                (user, false)
            }
            None => {
                let id = self.next_id;
                let user = User::new(
                    id,
                    &msg.appid,
                    &msg.session.openid,
                    msg.session.unionid.clone(),
                    msg.session.session_key.clone(),
                    now,
                );
                batch.put(
                    Tree::UsersByOpenid,
                    users::openid_key(&msg.appid, &msg.session.openid),
                    users::id_key(id),
                );
                if let (true, Some(unionid)) = (self.link_by_unionid, &msg.session.unionid) {
                    batch.put(Tree::UsersByUnionid, unionid.as_bytes(), users::id_key(id));
                }
                batch.put(Tree::Meta, NEXT_USER_ID_KEY, users::id_key(id + 1));
                (user, true)
            }
        };
        batch.put(Tree::Users, users::id_key(user.id), users::encode(&user));
        // The stamp read in this turn: a revoke (a message to this actor) lands
        // wholly before or after the login, never in between.
        let pair = issue::start_family(&msg.keys, &mut batch, user.id, user.token_stamp, now);
        self.store.apply(batch)?;
        self.users.put(user.clone());
        if created {
            // Only after the batch applied: a failed write never burns an id in memory
            // that the store did not record (and a recorded id is never handed out again).
            self.next_id += 1;
        }
        Ok(LoginOutcome::LoggedIn {
            user,
            created,
            pair: Box::new(pair),
        })
    }
}

impl Actor for UserRegistry {
    type Context = Context<Self>;
}

/// Find or create the user for this WeChat session, record the login, and start
/// its token family: one batch. Durable on return: the answer waits for the group
/// commit (joined in the same turn), on this actor's thread.
#[derive(Message)]
#[rtype(result = "Result<LoginOutcome, StorageError>")]
pub struct Login {
    pub appid: String,
    pub session: Session,
    /// The keys the login's tokens are signed with (the server's shared set).
    pub keys: Arc<JwtKeys>,
    /// The group commit the answer waits for.
    pub commit: GroupCommit,
    /// The request's span (its request id): the handler's log lines carry it.
    pub span: tracing::Span,
}

pub enum LoginOutcome {
    LoggedIn {
        user: User,
        created: bool,
        /// Boxed: the signed tokens and their claims make this variant large.
        pair: Box<TokenPair>,
    },
    Disabled,
}

impl Handler<Login> for UserRegistry {
    type Result = ResponseFuture<Result<LoginOutcome, StorageError>>;

    fn handle(&mut self, msg: Login, _: &mut Context<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        let commit = msg.commit.clone();
        let outcome = self.login(msg);
        // A disabled user's login writes nothing: no commit to wait for.
        let wrote = matches!(outcome, Ok(LoginOutcome::LoggedIn { .. }));
        let wait = wrote.then(|| commit.register());
        Box::pin(async move {
            if let Some(wait) = wait {
                wait.wait().await?;
            }
            outcome
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
            crate::now_unix().to_be_bytes(),
        );
        self.store.apply(batch)
    }
}

impl UserRegistry {
    /// Reads a user, lets `change` edit it, and writes it back. `None`: no such user.
    fn update(
        &mut self,
        id: UserId,
        change: impl FnOnce(&mut User),
    ) -> Result<Option<User>, StorageError> {
        let Some(mut user) = users::load(self.store.as_ref(), id)? else {
            return Ok(None);
        };
        change(&mut user);
        let mut batch = WriteBatch::default();
        batch.put(Tree::Users, users::id_key(id), users::encode(&user));
        self.store.apply(batch)?;
        self.users.put(user.clone());
        Ok(Some(user))
    }

    /// Disables (or enables) a user: its logins, refreshes and access tokens are
    /// refused from the next request on (they all read the user record).
    pub fn set_disabled(
        &mut self,
        id: UserId,
        disabled: bool,
    ) -> Result<Option<User>, StorageError> {
        self.update(id, |user| user.disabled = disabled)
    }

    /// Refuses every token of the user issued so far: they carry the old token stamp.
    /// Exact by construction (no clock involved); tokens signed after this write carry
    /// the new stamp. (Wrapping only after 2^64 revokes, and it still changes the stamp.)
    pub fn revoke_tokens(&mut self, id: UserId) -> Result<Option<User>, StorageError> {
        self.update(id, |user| {
            user.token_stamp = user.token_stamp.wrapping_add(1)
        })
    }
}

/// Records the phone number WeChat gave for a user. Not durable on return.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct SetPhone {
    pub user_id: UserId,
    pub phone: users::PhoneNumber,
}

impl Handler<SetPhone> for UserRegistry {
    type Result = Result<Option<User>, StorageError>;

    fn handle(&mut self, msg: SetPhone, _: &mut Context<Self>) -> Self::Result {
        self.update(msg.user_id, |user| user.phone = Some(Box::new(msg.phone)))
    }
}

/// Operator: disable or enable a user. Not durable on return (the caller commits).
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct SetDisabled {
    pub user_id: UserId,
    pub disabled: bool,
}

impl Handler<SetDisabled> for UserRegistry {
    type Result = Result<Option<User>, StorageError>;

    fn handle(&mut self, msg: SetDisabled, _: &mut Context<Self>) -> Self::Result {
        self.set_disabled(msg.user_id, msg.disabled)
    }
}

/// Operator: revoke every token issued to a user so far. Not durable on return.
#[derive(Message)]
#[rtype(result = "Result<Option<User>, StorageError>")]
pub struct RevokeTokens {
    pub user_id: UserId,
}

impl Handler<RevokeTokens> for UserRegistry {
    type Result = Result<Option<User>, StorageError>;

    fn handle(&mut self, msg: RevokeTokens, _: &mut Context<Self>) -> Self::Result {
        self.revoke_tokens(msg.user_id)
    }
}
