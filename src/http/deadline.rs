//! `server.request_timeout` for request bodies. actix-web's `client_request_timeout`
//! bounds only the head; a client that sends a complete head and then trickles (or
//! never sends) its body would hold the connection, and whatever waits on it, for
//! ever. Here the body stream itself carries the deadline: past it, the read fails,
//! and the request is answered 408 `request_timeout` with `Connection: close`.
//!
//! The deadline runs from the moment the head has arrived, so a request may take
//! up to twice `server.request_timeout` in all: one for the head, one for the body.
//! Only a body being read is timed: a handler that never reads the body answers at
//! once, and actix-http then closes the connection instead of waiting for the
//! unread bytes (lingering at most `client_disconnect_timeout`, 1 s).

use crate::error::ApiError;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::ConnectionType;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, ResponseError};
use futures_util::Stream;
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// Set when a request's body did not arrive in time.
#[derive(Clone, Default)]
pub struct BodyTimedOut(Rc<Cell<bool>>);

/// Puts the body of `req` (if it has one) under a deadline of `timeout` from now.
pub fn limit_body(req: &mut ServiceRequest, timeout: Duration) -> BodyTimedOut {
    let timed_out = BodyTimedOut::default();
    match req.take_payload() {
        Payload::None => {}
        inner => {
            let limited = DeadlinePayload {
                inner,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                timed_out: timed_out.clone(),
                finished: false,
            };
            let boxed: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(limited);
            req.set_payload(Payload::Stream { payload: boxed });
        }
    }
    timed_out
}

/// The response to send: the handler's, or a JSON 408 that closes the connection
/// when the body missed its deadline (whatever the handler made of the failed read).
pub fn answer<B: actix_web::body::MessageBody + 'static>(
    response: ServiceResponse<B>,
    timed_out: &BodyTimedOut,
) -> ServiceResponse<actix_web::body::BoxBody> {
    if !timed_out.0.get() {
        return response.map_into_boxed_body();
    }
    let (req, _) = response.into_parts();
    let mut timeout = ApiError::RequestTimeout.error_response();
    timeout
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    ServiceResponse::new(req, timeout)
}

struct DeadlinePayload {
    inner: Payload,
    deadline: Pin<Box<Sleep>>,
    timed_out: BodyTimedOut,
    finished: bool,
}

impl Stream for DeadlinePayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            this.finished = item.is_none();
            return Poll::Ready(item);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.finished = true;
            this.timed_out.0.set(true);
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive within server.request_timeout",
            )))));
        }
        Poll::Pending
    }
}

/// The head of a kept-alive connection's next request. actix-http times the head
/// of a connection's first request only (`client_request_timeout`), and stops its
/// keep-alive timer at the first byte of the next one: a client that sends a few
/// bytes of a second head and stalls would hold the connection for ever. So each
/// plain-TCP connection has a watch: when no request has been in progress for the
/// keep-alive time plus `server.request_timeout`, the socket is shut down (an
/// honest idle connection is closed by the keep-alive timer well before that).
///
/// The watch holds a duplicate of the socket's descriptor (the only safe way to shut
/// it down from outside actix-http), so a watched connection uses two descriptors;
/// the connection cap counts them. TLS connections are not watched.
pub struct ConnectionWatch {
    state: Rc<WatchState>,
    /// Dropped with the connection: wakes the watch, which then lets go of its descriptor.
    _gone: tokio::sync::oneshot::Sender<()>,
}

struct WatchState {
    in_progress: Cell<u32>,
    idle_since: Cell<tokio::time::Instant>,
}

/// For `HttpServer::on_connect`: starts the watch of a new plain-TCP connection.
pub fn watch_connection(
    connection: &dyn std::any::Any,
    extensions: &mut actix_web::dev::Extensions,
    idle_limit: Duration,
) {
    use std::os::fd::AsFd;
    let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    let Ok(descriptor) = stream.as_fd().try_clone_to_owned() else {
        return;
    };
    let state = Rc::new(WatchState {
        in_progress: Cell::new(0),
        idle_since: Cell::new(tokio::time::Instant::now()),
    });
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    extensions.insert(ConnectionWatch {
        state: state.clone(),
        _gone: gone_tx,
    });
    actix_web::rt::spawn(async move {
        loop {
            let wake = match state.in_progress.get() {
                0 => state.idle_since.get() + idle_limit,
                // A request's own deadlines bound it; look again later.
                _ => tokio::time::Instant::now() + idle_limit,
            };
            tokio::select! {
                _ = &mut gone => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if state.in_progress.get() == 0 && state.idle_since.get().elapsed() >= idle_limit {
                let socket = std::net::TcpStream::from(descriptor);
                let _ = socket.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    });
}

/// Marks a request of a watched connection as in progress until dropped.
pub struct RequestInProgress(Option<Rc<WatchState>>);

pub fn request_started(req: &ServiceRequest) -> RequestInProgress {
    let state = req
        .conn_data::<ConnectionWatch>()
        .map(|watch| watch.state.clone());
    if let Some(state) = &state {
        state.in_progress.set(state.in_progress.get() + 1);
    }
    RequestInProgress(state)
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state
                .in_progress
                .set(state.in_progress.get().saturating_sub(1));
            state.idle_since.set(tokio::time::Instant::now());
        }
    }
}
