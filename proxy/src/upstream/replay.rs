//! A request on its way to the upstream, kept so that it can be sent once
//! more when the upstream provably never processed it.
//!
//! HTTP/2 says when that is (RFC 9113 §8.7): the stream was reset with
//! REFUSED_STREAM, or it is above the last stream id of a GOAWAY, or the
//! connection failed before the request was written. Only then is a call
//! retried: this is a payment path, and anything the upstream may have
//! acted on is answered as it ended. To send it again, the request's
//! headers are copied before the first attempt, and the body's frames are
//! recorded as they are taken from the client (shared `Bytes`, not
//! copies), up to [`MAX_RECORDED`]; a call whose body went past that, or
//! failed, is not retried.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::SendStream;
use http::HeaderMap;
use http_body::Body as _;

use crate::body::RequestBody;

/// Most request body bytes kept for a retry: past it, the call is not
/// retried (its frames are let go).
pub(crate) const MAX_RECORDED: usize = 64 * 1024;

/// What was taken from the client's body so far.
#[derive(Default)]
pub(crate) struct Recorded {
    /// Recording (retries on, and not past the limit or a failure).
    on: bool,
    /// The frames taken, the first apart (a unary call's only one, with no
    /// allocation).
    first: Option<Bytes>,
    more: Vec<Bytes>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    /// The body's end was taken.
    finished: bool,
    /// Set once the upstream answered: nothing is retried after that.
    answered: Option<Arc<AtomicBool>>,
}

impl Recorded {
    fn data(&mut self, data: &Bytes) {
        if !self.on {
            return;
        }
        if self
            .answered
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed))
            || self.bytes + data.len() > MAX_RECORDED
        {
            self.give_up();
            return;
        }
        if !data.is_empty() {
            self.bytes += data.len();
            match self.first {
                None => self.first = Some(data.clone()),
                Some(_) => self.more.push(data.clone()),
            }
        }
    }

    fn give_up(&mut self) {
        self.on = false;
        self.first = None;
        self.more = Vec::new();
        self.trailers = None;
    }
}

/// A call's request, from its first attempt to its last.
pub(crate) struct Outgoing {
    /// The request head of the first attempt.
    first: Option<http::request::Parts>,
    /// A copy for a retry (when retries are on).
    again: Option<http::Request<()>>,
    /// The client's body, while no task pumps it.
    body: Option<RequestBody>,
    /// The task pumping the rest of a streaming body: it gives the body
    /// and its record back when it ends.
    pump: Option<tokio::task::JoinHandle<(RequestBody, Recorded)>>,
    recorded: Recorded,
}

impl Outgoing {
    /// `retries`: keep what a retry needs.
    pub(crate) fn new(parts: http::request::Parts, body: RequestBody, retries: bool) -> Self {
        let again = retries.then(|| {
            let mut r = http::Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        });
        Outgoing {
            first: Some(parts),
            again,
            body: Some(body),
            pump: None,
            recorded: Recorded {
                on: retries,
                ..Recorded::default()
            },
        }
    }

    /// The head to send now, and whether the request ends with it.
    pub(crate) fn head(&mut self) -> Option<(http::Request<()>, bool)> {
        let ends = match &self.body {
            Some(b) => self.recorded.first.is_none() && b.is_end_stream(),
            None => {
                self.recorded.finished
                    && self.recorded.first.is_none()
                    && self.recorded.trailers.is_none()
            }
        };
        let head = match self.first.take() {
            Some(parts) => http::Request::from_parts(parts, ()),
            None => self.again.take()?,
        };
        Some((head, ends))
    }

    /// Sends the body on `stream`: what was recorded (a retry), then what
    /// the client already sent, in this same turn, so it goes out in the
    /// write that carries the HEADERS; a task pumps the rest.
    pub(crate) async fn start(&mut self, mut stream: SendStream<Bytes>) {
        let rec = &self.recorded;
        let n = rec.first.iter().count() + rec.more.len();
        let done = self.body.is_none();
        for (i, f) in rec.first.iter().chain(&rec.more).enumerate() {
            let eos = done && rec.trailers.is_none() && i + 1 == n;
            let _ = stream.send_data(f.clone(), eos);
        }
        if done {
            if let Some(t) = &rec.trailers {
                let _ = stream.send_trailers(t.clone());
            }
            return;
        }
        let Some(mut body) = self.body.take() else {
            return;
        };
        let rec = &mut self.recorded;
        if body.is_end_stream() {
            // Sent with the HEADERS when nothing was recorded (see `head`).
            rec.finished = true;
            if n > 0 {
                let _ = stream.send_data(Bytes::new(), true);
            }
            return;
        }
        let eager = poll_fn(|cx| Poll::Ready(pipe(&mut body, &mut stream, cx, false, rec))).await;
        if eager.is_ready() {
            self.body = Some(body).filter(|_| !rec.finished);
            return;
        }
        let mut rec = std::mem::take(&mut self.recorded);
        if rec.on {
            rec.answered = Some(Arc::new(AtomicBool::new(false)));
            self.recorded.answered = rec.answered.clone();
        }
        self.pump = Some(tokio::spawn(async move {
            poll_fn(|cx| pipe(&mut body, &mut stream, cx, true, &mut rec)).await;
            (body, rec)
        }));
    }

    /// The upstream answered: nothing is kept for a retry from now on.
    pub(crate) fn answered(&mut self) {
        if let Some(a) = &self.recorded.answered {
            a.store(true, Ordering::Relaxed);
        }
        self.recorded.give_up();
    }

    /// Ready to be sent again: the body and its record back from the pump,
    /// when there is one. `false`: it cannot be (past the record's limit,
    /// or the client's body failed).
    pub(crate) async fn rewind(&mut self) -> bool {
        if self.again.is_none() || !self.recorded.on && self.pump.is_none() {
            return false;
        }
        if let Some(pump) = self.pump.take() {
            // Its stream was reset or refused: it ends at once.
            let Ok((body, rec)) = pump.await else {
                return false;
            };
            self.body = Some(body).filter(|_| !rec.finished);
            self.recorded = rec;
            self.recorded.answered = None;
        }
        self.recorded.on
    }

    /// Sets the head's `grpc-timeout` for a retry.
    pub(crate) fn set_timeout(&mut self, left: std::time::Duration) {
        if let Some(r) = &mut self.again {
            if let Ok(v) = http::HeaderValue::from_str(&crate::grpc::timeout::encode(left)) {
                r.headers_mut().insert("grpc-timeout", v);
            }
        }
    }
}

/// Moves the client's request body to the upstream stream, recording what
/// it takes in `rec`. With `backpressure`, waits for the upstream's
/// flow-control window before taking more from the client (the eager first
/// pass does not: what it sends was already received). Ready when the body
/// is done (or failed, in which case the upstream stream is reset).
fn pipe(
    body: &mut RequestBody,
    stream: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    backpressure: bool,
    rec: &mut Recorded,
) -> Poll<()> {
    loop {
        if backpressure {
            stream.reserve_capacity(1);
            if stream.capacity() == 0 {
                loop {
                    match std::task::ready!(stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    rec.data(&data);
                    rec.finished = eos;
                    if stream.send_data(data, eos).is_err() || eos {
                        return Poll::Ready(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        if rec.on {
                            rec.trailers = Some(trailers.clone());
                        }
                        rec.finished = true;
                        stream.reserve_capacity(0);
                        let _ = stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            },
            Some(Err(_)) => {
                // The client's stream failed or its framing was refused:
                // the upstream must not see a partial call as complete.
                rec.give_up();
                stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
            None => {
                rec.finished = true;
                let _ = stream.send_data(Bytes::new(), true);
                return Poll::Ready(());
            }
        }
    }
}
