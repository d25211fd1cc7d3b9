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

use super::connection::{ConnectionWatch, WatchState};
use crate::http::error::ApiError;
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
struct BodyTimedOut(Rc<Cell<bool>>);

/// Puts the body of `req` (if it has one) under a deadline of `timeout` from now.
fn limit_body(req: &mut ServiceRequest, timeout: Duration) -> BodyTimedOut {
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
fn answer<B: actix_web::body::MessageBody + 'static>(
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

/// Every listener's request middleware (innermost, `App::wrap_fn`): the body's
/// deadline, and the connection marked busy while the request is handled (its idle
/// bound does not run meanwhile, see [`super::connection`]). Past the connection's
/// lifetime (`server.max_connection_lifetime`) the answer says `Connection: close`.
pub fn guard<S, B>(
    mut req: ServiceRequest,
    srv: &S,
    request_timeout: Duration,
) -> impl Future<Output = Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error>>
where
    S: actix_web::dev::Service<
        ServiceRequest,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: actix_web::body::MessageBody + 'static,
{
    let in_progress = request_started(&req);
    let timed_out = limit_body(&mut req, request_timeout);
    let response = srv.call(req);
    async move {
        let response = response.await?;
        let mut response = answer(response, &timed_out);
        in_progress.finish(&mut response);
        Ok(response)
    }
}

/// Marks a request of a watched connection as in progress until dropped.
struct RequestInProgress(Option<Rc<WatchState>>);

fn request_started(req: &ServiceRequest) -> RequestInProgress {
    let state = req
        .conn_data::<ConnectionWatch>()
        .map(|watch| watch.0.clone());
    if let Some(state) = &state {
        state.in_progress.set(state.in_progress.get() + 1);
    }
    RequestInProgress(state)
}

impl RequestInProgress {
    /// Closes the connection after this answer once it has lived its lifetime.
    fn finish<B>(self, response: &mut ServiceResponse<B>) {
        if let Some(state) = &self.0 {
            if tokio::time::Instant::now() >= state.expires {
                response
                    .response_mut()
                    .head_mut()
                    .set_connection_type(ConnectionType::Close);
            }
        }
    }
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
