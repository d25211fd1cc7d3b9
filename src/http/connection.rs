//! Every listener's connections (the API, metrics, the access-token endpoint), plain
//! TCP and TLS alike, go through one guard. The accepted socket is wrapped in a
//! [`GuardedStream`] before anything reads it (TLS sits on top of it), which:
//!
//! - admits it against the per-address limit (`server.max_connections_per_ip`, the
//!   API only; trusted proxies exempt) or closes it at once;
//! - drops it when a write has made no progress for `server.request_timeout` (a
//!   client that reads nothing);
//! - reads nothing while a write is blocked, and at most [`READ_BUDGET`] bytes per
//!   turn of the connection, so pipelined requests cannot pile up answers in memory:
//!   what one connection holds is bounded by actix-http's write buffer and pipeline;
//! - closes it when no request has been in progress for the keep-alive time plus
//!   `server.request_timeout` (actix-http times only the first request's head, so a
//!   kept-alive connection whose next head stalls would otherwise be held for ever).
//!
//! Each request marks its connection busy while it is handled
//! ([`super::deadline::guard`]); past `server.max_connection_lifetime` the next
//! response says `Connection: close`.

use actix_http::body::MessageBody;
use actix_http::{HttpService, Request, Response};
use actix_service::{
    fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt,
};
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::rt::net::{ActixStream, Ready, TcpStream};
use std::cell::Cell;
use std::collections::HashMap;
use std::future::{ready, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes read from one connection per turn (one run of reads, after which actix-http
/// handles what it read before it reads again; TLS handshakes too). A request head
/// and a login or refresh body fit in one or two turns; a client that pipelines small
/// requests gets a few dozen decoded at a time, not thousands.
pub const READ_BUDGET: usize = 1024;
/// Connections waiting in the kernel's queue once a listener is at its cap.
const BACKLOG: u32 = 2048;
/// How long a connection whose answer said `Connection: close` may linger (actix-web's default).
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A refused-connection warning at most this often (an attack must not flood the log).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one listener allows.
#[derive(Clone)]
pub struct ListenerLimits {
    /// Open connections, the whole listener; the excess waits in the listen backlog.
    pub max_connections: usize,
    /// actix-http's keep-alive: an idle connection's wait for its next request.
    pub keep_alive: Duration,
    /// `server.request_timeout`: a head, a body, and a blocked write.
    pub request_timeout: Duration,
    /// `server.max_connection_lifetime`.
    pub lifetime: Duration,
    pub per_ip: Option<PerIpLimit>,
}

/// Open connections per client address (`server.max_connections_per_ip`), counted the
/// way the login limiter counts clients (IPv6 per `limits.ipv6_prefix`).
#[derive(Clone)]
pub struct PerIpLimit(Arc<PerIpTable>);

struct PerIpTable {
    max: u32,
    ipv6_prefix: u8,
    exempt: Vec<IpAddr>,
    /// Only addresses with an open connection: at most one entry per connection.
    open: Mutex<HashMap<IpAddr, u32>>,
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl PerIpLimit {
    /// `exempt`: the trusted proxies (canonical addresses), for which every client
    /// behind them is one peer.
    pub fn new(max: usize, ipv6_prefix: u8, exempt: Vec<IpAddr>) -> Self {
        PerIpLimit(Arc::new(PerIpTable {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            ipv6_prefix,
            exempt,
            open: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }))
    }

    /// A slot for one more connection from `peer`; `Err` when it is at its limit.
    fn admit(&self, peer: IpAddr) -> Result<Option<IpSlot>, IpAddr> {
        let table = &self.0;
        if table.exempt.contains(&super::canonical_ip(peer)) {
            return Ok(None);
        }
        let key = super::ratelimit::client_key(peer, table.ipv6_prefix);
        let mut open = table.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= table.max {
            return Err(key);
        }
        *count += 1;
        Ok(Some(IpSlot {
            key,
            table: self.0.clone(),
        }))
    }

    fn refused(&self, key: IpAddr) {
        let table = &self.0;
        let refused = table.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = table
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= REFUSED_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                client = %key,
                limit = table.max,
                refused_since_start = refused,
                "connection refused: the client is at server.max_connections_per_ip"
            );
        }
    }

    #[cfg(test)]
    fn open(&self, key: IpAddr) -> u32 {
        let open = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&key).copied().unwrap_or(0)
    }
}

/// One counted connection; gives its slot back when the connection is dropped.
struct IpSlot {
    key: IpAddr,
    table: Arc<PerIpTable>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A connection's activity, shared between its stream and its requests.
pub(crate) struct WatchState {
    pub(crate) in_progress: Cell<u32>,
    pub(crate) idle_since: Cell<Instant>,
    pub(crate) expires: Instant,
}

/// In every request's connection data: what [`super::deadline::guard`] marks.
#[derive(Clone)]
pub struct ConnectionWatch(pub(crate) Rc<WatchState>);

/// An accepted TCP stream under the connection's bounds (see the module docs).
pub struct GuardedStream {
    io: TcpStream,
    peer: Option<SocketAddr>,
    watch: Rc<WatchState>,
    idle_limit: Duration,
    write_timeout: Duration,
    /// Fires at the earliest moment the connection could have been idle too long.
    idle_timer: Pin<Box<Sleep>>,
    /// Armed while a write is blocked.
    write_deadline: Option<Pin<Box<Sleep>>>,
    /// What this turn may still read: a turn is one run of reads, which ends when
    /// the socket has nothing more or the budget is spent.
    read_budget: usize,
    /// The last read stopped for the budget; the next one starts a new turn.
    paused: bool,
    write_blocked: bool,
    _slot: Option<IpSlot>,
}

impl GuardedStream {
    /// Admits `io` under `limits`; `None` (the socket is closed) when its address is
    /// at its limit.
    fn accept(io: TcpStream, limits: &ListenerLimits) -> Option<GuardedStream> {
        let peer = io.peer_addr().ok();
        let slot = match (&limits.per_ip, peer) {
            (Some(per_ip), Some(peer)) => match per_ip.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(key) => {
                    per_ip.refused(key);
                    return None;
                }
            },
            _ => None,
        };
        let now = Instant::now();
        let idle_limit = limits.keep_alive + limits.request_timeout;
        Some(GuardedStream {
            io,
            peer,
            watch: Rc::new(WatchState {
                in_progress: Cell::new(0),
                idle_since: Cell::new(now),
                expires: now + limits.lifetime,
            }),
            idle_limit,
            write_timeout: limits.request_timeout,
            idle_timer: Box::pin(tokio::time::sleep_until(now + idle_limit)),
            write_deadline: None,
            read_budget: READ_BUDGET,
            paused: false,
            write_blocked: false,
            _slot: slot,
        })
    }

    /// True once no request has been in progress for `idle_limit`; otherwise the
    /// timer is armed to wake this connection's task when that could first be true.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.watch.in_progress.get() > 0 {
            // The request's own deadlines bound it; it polls the stream again when done.
            return false;
        }
        let due = self.watch.idle_since.get() + self.idle_limit;
        loop {
            if self.idle_timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= due {
                return true;
            }
            // A request ended since the timer was set: wait for the later moment.
            self.idle_timer.as_mut().reset(due);
        }
    }

    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.write_blocked = true;
        let timeout = self.write_timeout;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within server.request_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_blocked {
            // Answers wait to be written: read no more requests until the client
            // takes them (the flush that completes wakes this task).
            return Poll::Pending;
        }
        if this.idle_expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the keep-alive time and server.request_timeout",
            )));
        }
        if this.read_budget == 0 {
            if !this.paused {
                // This turn's share is read: let the connection handle it first (it
                // comes back at once, and the next read starts a new turn).
                this.paused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.paused = false;
            this.read_budget = READ_BUDGET;
        }
        let before = buf.filled().len();
        let polled = if buf.remaining() <= this.read_budget {
            Pin::new(&mut this.io).poll_read(cx, buf)
        } else {
            let mut chunk = [0u8; READ_BUDGET];
            let mut limited = ReadBuf::new(&mut chunk[..this.read_budget]);
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut limited);
            buf.put_slice(limited.filled());
            polled
        };
        let read = buf.filled().len() - before;
        this.read_budget = if polled.is_pending() {
            // Nothing more to read: the turn ends here.
            READ_BUDGET
        } else {
            this.read_budget.saturating_sub(read)
        };
        polled
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    // The client is reading: the write timeout starts again.
                    this.write_deadline = None;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.write_pending(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if flushed.is_ready() {
            // Everything answered so far has reached the kernel: read again.
            if this.write_blocked {
                this.write_blocked = false;
                cx.waker().wake_by_ref();
            }
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl ActixStream for GuardedStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.io, cx)
    }
}

/// Puts the connection's watch where its requests find it (`req.conn_data`).
fn attach(stream: &GuardedStream, extensions: &mut Extensions) {
    extensions.insert(ConnectionWatch(stream.watch.clone()));
}

/// A listening socket with actix-web's backlog, ready for [`serve`].
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// Serves the app made by `factory` on `listener` (HTTP/1.1, or HTTPS with `tls`)
/// with `workers` threads, every connection under `limits`. The server runs until
/// its handle stops it; signals are the caller's.
pub fn serve<F, I, S, B>(
    name: &str,
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    workers: usize,
    shutdown_timeout: u64,
    limits: ListenerLimits,
    factory: F,
) -> io::Result<actix_server::Server>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as actix_service::Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let builder = actix_server::ServerBuilder::default();
    let signal = builder.graceful_shutdown_signal();
    // actix counts connections per worker.
    let per_worker = limits.max_connections.div_ceil(workers).max(1);
    let builder = builder
        .workers(workers)
        .max_concurrent_connections(per_worker)
        .backlog(BACKLOG)
        .shutdown_timeout(shutdown_timeout)
        // The caller's handler stops the server (and tells systemd first).
        .disable_signals();
    let builder = match tls {
        None => builder.listen(name, listener, move || {
            let limits = limits.clone();
            let http = h1::<GuardedStream, _, _, _, _>(&factory, &signal, &limits, |s| s);
            fn_service(move |io: TcpStream| {
                ready(
                    GuardedStream::accept(io, &limits)
                        .map(|stream| {
                            let peer = stream.peer;
                            (stream, peer)
                        })
                        .ok_or(()),
                )
            })
            .and_then(http)
        })?,
        Some(tls) => builder.listen(name, listener, move || {
            let limits = limits.clone();
            let http =
                h1::<TlsStream<GuardedStream>, _, _, _, _>(&factory, &signal, &limits, |s| {
                    s.get_ref().0
                });
            fn_service(move |io: TcpStream| ready(GuardedStream::accept(io, &limits).ok_or(())))
                .and_then(Acceptor::new(tls.clone()).map_err(|_| ()))
                .map(|stream: TlsStream<GuardedStream>| {
                    let peer = stream.get_ref().0.peer;
                    (stream, peer)
                })
                .and_then(http)
        })?,
    };
    Ok(builder.run())
}

/// One worker's HTTP/1.1 service over the guarded stream `T` (plain or TLS).
fn h1<T, F, I, S, B>(
    factory: &F,
    signal: &actix_server::GracefulShutdownSignal,
    limits: &ListenerLimits,
    guarded: fn(&T) -> &GuardedStream,
) -> impl ServiceFactory<(T, Option<SocketAddr>), Config = (), Response = (), Error = (), InitError = ()>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
    F: Fn() -> I,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as actix_service::Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let signal = signal.clone();
    let app = factory()
        .into_factory()
        .map_err(|err| err.into().error_response());
    HttpService::build()
        .keep_alive(limits.keep_alive)
        // The first head's deadline (actix's own); bodies: deadline::guard.
        .client_request_timeout(limits.request_timeout)
        .client_disconnect_timeout(DISCONNECT_TIMEOUT)
        // A client that closes its side has gone (as nginx takes it): its handler is
        // dropped, so a login still waiting for a WeChat call slot is never sent.
        .h1_allow_half_closed(false)
        .graceful_shutdown_signal(move || {
            let signal = signal.clone();
            async move { signal.notified().await }
        })
        .on_connect_ext(move |io: &T, extensions: &mut Extensions| attach(guarded(io), extensions))
        .h1(map_config(app, |_| AppConfig::default()))
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::PerIpLimit;
    use std::net::IpAddr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_gets_its_limit_and_its_slots_back() {
        let limit = PerIpLimit::new(2, 64, Vec::new());
        let first = limit.admit(ip("192.0.2.1")).unwrap();
        let _second = limit.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(limit.admit(ip("192.0.2.1")).err(), Some(ip("192.0.2.1")));
        // Another address has its own count.
        assert!(limit.admit(ip("192.0.2.2")).is_ok());
        drop(first);
        assert!(limit.admit(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn ipv6_is_counted_per_prefix_and_mapped_ipv4_as_ipv4() {
        let limit = PerIpLimit::new(1, 64, Vec::new());
        let _slot = limit.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(limit.admit(ip("2001:db8:1:2::ffff")).is_err());
        assert!(limit.admit(ip("2001:db8:1:3::1")).is_ok());
        let _v4 = limit.admit(ip("192.0.2.9")).unwrap();
        assert!(limit.admit(ip("::ffff:192.0.2.9")).is_err());
    }

    #[test]
    fn trusted_proxies_are_exempt_and_the_table_empties() {
        let limit = PerIpLimit::new(1, 64, vec![ip("127.0.0.1")]);
        let slots: Vec<_> = (0..5)
            .map(|_| limit.admit(ip("127.0.0.1")).unwrap())
            .collect();
        assert!(
            slots.iter().all(Option::is_none),
            "an exempt peer is not counted"
        );
        assert!(limit.admit(ip("::ffff:127.0.0.1")).unwrap().is_none());
        let slot = limit.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(limit.open(ip("192.0.2.1")), 1);
        drop(slot);
        assert_eq!(limit.open(ip("192.0.2.1")), 0);
        assert!(limit.0.open.lock().unwrap().is_empty());
    }
}
