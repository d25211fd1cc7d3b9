//! Web login tickets: a browser logs in as the user who confirms on the phone.
//!
//! The rules (states, answers, refusals) are in docs/API.md, "Web login". Here:
//! - a ticket is 16 random bytes (32 hex characters: the mini-program code's
//!   `scene`, which takes at most 32); its poll secret is 32 more random bytes,
//!   kept only as a SHA-256 digest and never put in the code;
//! - tickets live in this process's memory only (a restart forgets them: the
//!   browser asks for a new one), at most `web_login.max_tickets` at once, each for
//!   `web_login.ticket_ttl`, and never reach the logs;
//! - a waiting poll holds no thread: it awaits the ticket's `watch` channel with a
//!   timeout, and at most [`MAX_WAITERS`] polls wait at once.
//!
//! One `Mutex` around the map (a shared handle like `WeChatClient`): every
//! operation is a short critical section with no I/O; the confirm's storage work
//! runs between [`WebLogins::begin_confirm`] and [`WebLogins::finish_confirm`],
//! outside it.

use crate::users::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Polls waiting at once, the whole server; past it 503.
pub const MAX_WAITERS: usize = 4096;
/// The longest `?wait=` a poll may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 25;

/// The token pair a confirm made, waiting for the browser.
#[derive(Clone)]
pub struct WebTokens {
    pub user_id: UserId,
    pub access: String,
    pub refresh: String,
    pub access_expires_in: i64,
    pub refresh_expires_in: i64,
}

impl std::fmt::Debug for WebTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebTokens(user {}, [redacted])", self.user_id)
    }
}

/// What a poll answers.
#[derive(Debug)]
pub enum Status {
    Pending,
    Scanned,
    /// Handed out once: the ticket is spent after this answer.
    Confirmed(Box<WebTokens>),
    Denied,
    /// Expired, spent, or never issued here (a restart forgets every ticket).
    Expired,
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Scanned => "scanned",
            Status::Confirmed(_) => "confirmed",
            Status::Denied => "denied",
            Status::Expired => "expired",
        }
    }
}

/// Every refusal of a ticket operation; `http/error.rs` maps each.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WebLoginError {
    #[error("Too many web logins are open; try again shortly.")]
    TooManyTickets,
    #[error("Too many web logins are waiting; try again shortly.")]
    TooManyWaiters,
    #[error("The poll secret is not the one issued with this ticket.")]
    PollSecret,
    #[error("This web login has expired, was used, or does not exist.")]
    Expired,
    #[error("This web login was already confirmed or denied.")]
    Closed,
    #[error("This web login was scanned by another user.")]
    Taken,
}

enum State {
    Pending,
    Scanned {
        user_id: UserId,
    },
    /// A confirm is writing the session: another confirm or a deny is refused; a
    /// poll sees "scanned".
    Confirming,
    Confirmed(Box<WebTokens>),
    /// The tokens went to the browser.
    Consumed,
    Denied,
}

struct Ticket {
    secret_digest: [u8; 32],
    expires_at: Instant,
    state: State,
    /// Bumped at every change of `state`: what a waiting poll awaits.
    changed: watch::Sender<u64>,
}

impl Ticket {
    fn touch(&mut self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A new ticket, as `POST /api/weixin/web-login/` answers it.
pub struct Issued {
    pub ticket: String,
    pub poll_secret: String,
    pub expires_in: u64,
}

pub struct WebLogins {
    tickets: Mutex<HashMap<String, Ticket>>,
    ttl: Duration,
    max_tickets: usize,
    waiters: AtomicUsize,
}

fn digest(secret: &str) -> [u8; 32] {
    let hash = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    hash.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A ticket as the path carries it: exactly 32 lowercase hex characters.
pub fn is_ticket(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a poll of an unsettled ticket waits on: its changes, until its expiry.
type Wait = (watch::Receiver<u64>, Instant);

/// One waiting poll, counted while it lives.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WebLogins {
    pub fn new(ttl: Duration, max_tickets: usize) -> Self {
        WebLogins {
            tickets: Mutex::new(HashMap::new()),
            ttl,
            max_tickets,
            waiters: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ticket>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new pending ticket; past the cap (expired ones swept first) a refusal.
    pub fn create(&self) -> Result<Issued, WebLoginError> {
        let now = Instant::now();
        let mut tickets = self.lock();
        if tickets.len() >= self.max_tickets {
            tickets.retain(|_, t| t.expires_at > now);
        }
        if tickets.len() >= self.max_tickets {
            return Err(WebLoginError::TooManyTickets);
        }
        let ticket = crate::ids::random_hex(16);
        let poll_secret = crate::ids::random_hex(32);
        tickets.insert(
            ticket.clone(),
            Ticket {
                secret_digest: digest(&poll_secret),
                expires_at: now + self.ttl,
                state: State::Pending,
                changed: watch::Sender::new(0),
            },
        );
        Ok(Issued {
            ticket,
            poll_secret,
            expires_in: self.ttl.as_secs(),
        })
    }

    /// Drops a ticket whose code could not be made (it never reached anyone).
    pub fn forget(&self, ticket: &str) {
        self.lock().remove(ticket);
    }

    /// The ticket's status now, for the holder of its poll secret; a confirmed
    /// ticket's tokens are taken (once). Also what a poll waits on, and until when.
    fn look(&self, ticket: &str, secret: &str) -> Result<(Status, Option<Wait>), WebLoginError> {
        let now = Instant::now();
        let mut tickets = self.lock();
        let Some(entry) = tickets.get_mut(ticket) else {
            return Ok((Status::Expired, None));
        };
        if entry.expires_at <= now {
            tickets.remove(ticket);
            return Ok((Status::Expired, None));
        }
        let presented = digest(secret);
        let same = presented
            .iter()
            .zip(entry.secret_digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !same {
            return Err(WebLoginError::PollSecret);
        }
        let status = match &entry.state {
            State::Pending => Status::Pending,
            State::Scanned { .. } | State::Confirming => Status::Scanned,
            State::Denied => Status::Denied,
            State::Consumed => Status::Expired,
            State::Confirmed(_) => {
                let State::Confirmed(tokens) = std::mem::replace(&mut entry.state, State::Consumed)
                else {
                    unreachable!("matched above")
                };
                entry.touch();
                return Ok((Status::Confirmed(tokens), None));
            }
        };
        let wait = matches!(status, Status::Pending | Status::Scanned)
            .then(|| (entry.changed.subscribe(), entry.expires_at));
        Ok((status, wait))
    }

    /// The poll: answers at once when the ticket is settled or `wait` is zero,
    /// else when its state changes, it expires, or `wait` passes.
    pub async fn poll(
        &self,
        ticket: &str,
        secret: &str,
        wait: Duration,
    ) -> Result<Status, WebLoginError> {
        let (status, watch) = self.look(ticket, secret)?;
        let Some((mut changed, expires_at)) = watch.filter(|_| !wait.is_zero()) else {
            return Ok(status);
        };
        if self.waiters.fetch_add(1, Ordering::AcqRel) >= MAX_WAITERS {
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            return Err(WebLoginError::TooManyWaiters);
        }
        let _waiter = Waiter(&self.waiters);
        let until = (Instant::now() + wait).min(expires_at);
        // A change, the expiry or the wait's end: whichever comes first. A closed
        // channel (the ticket was swept) reads as a change.
        let _ = tokio::time::timeout_at(until.into(), changed.changed()).await;
        Ok(self.look(ticket, secret)?.0)
    }

    /// Runs `change` on a live ticket (`None`: unknown or expired).
    fn with_live<T>(
        &self,
        ticket: &str,
        change: impl FnOnce(&mut Ticket) -> Result<T, WebLoginError>,
    ) -> Result<T, WebLoginError> {
        let now = Instant::now();
        let mut tickets = self.lock();
        match tickets.get_mut(ticket) {
            Some(entry) if entry.expires_at > now => change(entry),
            Some(_) => {
                tickets.remove(ticket);
                Err(WebLoginError::Expired)
            }
            None => Err(WebLoginError::Expired),
        }
    }

    /// The mini-program opened the code: the browser shows "scanned". The ticket
    /// is the scanning user's from now on.
    pub fn scan(&self, ticket: &str, user_id: UserId) -> Result<(), WebLoginError> {
        self.with_live(ticket, |entry| match entry.state {
            State::Pending => {
                entry.state = State::Scanned { user_id };
                entry.touch();
                Ok(())
            }
            State::Scanned { user_id: by } if by == user_id => Ok(()),
            State::Scanned { .. } => Err(WebLoginError::Taken),
            State::Confirming | State::Confirmed(_) | State::Consumed | State::Denied => {
                Err(WebLoginError::Closed)
            }
        })
    }

    /// The first half of a confirm: the ticket is pending, or scanned by this
    /// user; it is held against any other confirm or deny until
    /// [`finish_confirm`](Self::finish_confirm) or [`abort_confirm`](Self::abort_confirm).
    pub fn begin_confirm(&self, ticket: &str, user_id: UserId) -> Result<(), WebLoginError> {
        self.with_live(ticket, |entry| match entry.state {
            State::Pending => {
                entry.state = State::Confirming;
                entry.touch();
                Ok(())
            }
            State::Scanned { user_id: by } if by == user_id => {
                entry.state = State::Confirming;
                Ok(())
            }
            State::Scanned { .. } => Err(WebLoginError::Taken),
            State::Confirming | State::Confirmed(_) | State::Consumed | State::Denied => {
                Err(WebLoginError::Closed)
            }
        })
    }

    /// The session is durable: its tokens wait for the browser. `Expired`: the
    /// ticket ran out meanwhile (the tokens are dropped; their family just expires).
    pub fn finish_confirm(&self, ticket: &str, tokens: WebTokens) -> Result<(), WebLoginError> {
        self.with_live(ticket, |entry| {
            entry.state = State::Confirmed(Box::new(tokens));
            entry.touch();
            Ok(())
        })
    }

    /// The session could not be started: the ticket is back to scanned by `user_id`.
    pub fn abort_confirm(&self, ticket: &str, user_id: UserId) {
        let _ = self.with_live(ticket, |entry| {
            if matches!(entry.state, State::Confirming) {
                entry.state = State::Scanned { user_id };
                entry.touch();
            }
            Ok(())
        });
    }

    /// The user said no on the phone.
    pub fn deny(&self, ticket: &str, user_id: UserId) -> Result<(), WebLoginError> {
        self.with_live(ticket, |entry| match entry.state {
            State::Pending => {
                entry.state = State::Denied;
                entry.touch();
                Ok(())
            }
            State::Scanned { user_id: by } if by == user_id => {
                entry.state = State::Denied;
                entry.touch();
                Ok(())
            }
            State::Scanned { .. } => Err(WebLoginError::Taken),
            State::Confirming | State::Confirmed(_) | State::Consumed | State::Denied => {
                Err(WebLoginError::Closed)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> WebTokens {
        WebTokens {
            user_id: 7,
            access: "a".into(),
            refresh: "r".into(),
            access_expires_in: 300,
            refresh_expires_in: 86400,
        }
    }

    #[test]
    fn a_ticket_goes_from_pending_to_confirmed_once() {
        let logins = WebLogins::new(Duration::from_secs(60), 10);
        let t = logins.create().unwrap();
        assert!(is_ticket(&t.ticket));
        let poll = |s: &str| {
            futures_util::FutureExt::now_or_never(logins.poll(&t.ticket, s, Duration::ZERO))
                .unwrap()
        };
        assert!(matches!(poll(&t.poll_secret), Ok(Status::Pending)));
        assert!(matches!(poll("wrong"), Err(WebLoginError::PollSecret)));
        logins.scan(&t.ticket, 7).unwrap();
        assert!(matches!(
            logins.scan(&t.ticket, 8),
            Err(WebLoginError::Taken)
        ));
        assert!(matches!(poll(&t.poll_secret), Ok(Status::Scanned)));
        logins.begin_confirm(&t.ticket, 7).unwrap();
        assert!(matches!(
            logins.begin_confirm(&t.ticket, 7),
            Err(WebLoginError::Closed)
        ));
        logins.finish_confirm(&t.ticket, tokens()).unwrap();
        assert!(matches!(poll(&t.poll_secret), Ok(Status::Confirmed(_))));
        assert!(matches!(poll(&t.poll_secret), Ok(Status::Expired)));
        assert!(matches!(
            logins.deny(&t.ticket, 7),
            Err(WebLoginError::Closed)
        ));
    }

    #[test]
    fn the_cap_refuses_until_tickets_expire() {
        let logins = WebLogins::new(Duration::ZERO, 2);
        logins.create().unwrap();
        logins.create().unwrap();
        // Both expired at once (ttl 0): swept, so room again.
        logins.create().unwrap();
        let logins = WebLogins::new(Duration::from_secs(60), 1);
        logins.create().unwrap();
        assert!(matches!(
            logins.create(),
            Err(WebLoginError::TooManyTickets)
        ));
    }
}
