//! Message bodies as they pass through tollgate, in both directions,
//! observed frame by frame and never buffered.
//!
//! [`RequestBody`] is what goes to the upstream: the client's body behind a
//! [`FrameObserver`]. A framing problem stops it with an error (hyper then
//! resets the upstream stream) and is written to the call's [`CallState`],
//! where the response side finds it and tells the client why.
//!
//! [`ResponseBody`] is what goes to the client: the upstream's body behind
//! its own observer, the call's deadline, and the bookkeeping that counts
//! the call once it ends (or is cancelled).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::access::Record;
use crate::call::{CallState, OpenCall, Watch};
use crate::grpc::frame::{FrameError, FrameObserver};
use crate::grpc::status::{parse_status, status_headers, Code};
use crate::limit::meter::{Meters, Verdict};
use crate::limit::step::Charges;
use crate::metrics::{self, MethodStats, RouteStats};
use crate::upstream::OpenStream;

/// What a body needs of its call's route: the counters its messages go to,
/// and the upstream its errors name. [`crate::routes::Route`] is one; bodies
/// do not depend on how routes are built.
pub(crate) trait RouteCounters: Send + Sync {
    /// The route's counters (and its name).
    fn stats(&self) -> &RouteStats;
    /// The name of the route's upstream.
    fn upstream_name(&self) -> &str;
}

/// What ends a call that takes too long: its deadline, and (unless the
/// deadline comes first) its connection watching it for the stream idle
/// timeout; a client cannot opt out of the watch with a far deadline.
#[derive(Default)]
pub(crate) struct CallTimer {
    /// The client's `grpc-timeout` or the route's timeout, with the reason
    /// the client is given.
    pub(crate) deadline: Option<(Pin<Box<Sleep>>, &'static str)>,
    /// The watch, and the stream idle timeout it ends the call after.
    pub(crate) idle: Option<(Watch, std::time::Duration)>,
}

// === impl CallTimer ===

impl CallTimer {
    /// Whether it has neither.
    pub(crate) fn is_none(&self) -> bool {
        self.deadline.is_none() && self.idle.is_none()
    }

    /// Ready with the client's message once either has run out.
    pub(crate) fn poll_expired(&mut self, state: &CallState, cx: &mut Context<'_>) -> Poll<String> {
        if let Some((sleep, why)) = &mut self.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready((*why).to_owned());
            }
        }
        if let Some((_, idle)) = &self.idle {
            if state.poll_expired(cx).is_ready() {
                return Poll::Ready(idle_message(*idle));
            }
        }
        Poll::Pending
    }
}

/// The message of a call ended by the stream idle timeout.
pub(crate) fn idle_message(idle: std::time::Duration) -> String {
    format!(
        "no message either way for {} (listener.stream_idle_timeout): give long calls a deadline",
        humantime::format_duration(idle)
    )
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The client's stream failed (reset, connection lost).
    #[error("client stream: {0}")]
    Client(#[from] hyper::Error),
    /// The client's framing was refused.
    #[error("{0}")]
    Frame(FrameError),
    /// The client's messages went over a message limit.
    #[error("{0}")]
    Limited(String),
}

/// Messages held back by a message limit until it allows them: waiting
/// for the rate (`action: delay`), or for Redis's decision.
pub(crate) struct Waiting {
    frame: Frame<Bytes>,
    messages: u64,
    /// Until the rate allows them (`None`: no wait, a decision pending).
    sleep: Option<Pin<Box<Sleep>>>,
}

/// What a data chunk's messages get from a direction's meters: `Ok(Ok)`
/// to go on now, `Ok(Err(..))` to wait (then [`poll_waiting`]), `Err` to
/// end the stream.
fn meter(
    meters: &mut Option<Box<Meters>>,
    frame: Frame<Bytes>,
    messages: u64,
    cx: &mut Context<'_>,
) -> Result<Result<Frame<Bytes>, Box<Waiting>>, String> {
    let Some(m) = meters.as_mut().filter(|_| messages > 0) else {
        return Ok(Ok(frame));
    };
    let sleep = match m.poll_admit(messages, cx) {
        Poll::Ready(Verdict::Pass) => return Ok(Ok(frame)),
        Poll::Ready(Verdict::Refuse(why)) => return Err(why),
        Poll::Ready(Verdict::Wait(d)) => Some(Box::pin(tokio::time::sleep(d))),
        Poll::Pending => None,
    };
    Ok(Err(Box::new(Waiting {
        frame,
        messages,
        sleep,
    })))
}

/// Polls held-back messages: ready with their frame once every meter
/// allows them.
fn poll_waiting(
    waiting: &mut Option<Box<Waiting>>,
    meters: &mut Option<Box<Meters>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Frame<Bytes>, String>> {
    loop {
        let Some(w) = waiting.as_mut() else {
            return Poll::Pending;
        };
        if let Some(sleep) = w.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        let verdict = match meters.as_mut() {
            Some(m) => ready!(m.poll_admit(w.messages, cx)),
            None => Verdict::Pass,
        };
        match verdict {
            Verdict::Pass => {
                let w = waiting.take().map(|w| w.frame);
                return Poll::Ready(w.ok_or_else(String::new));
            }
            Verdict::Refuse(why) => {
                *waiting = None;
                return Poll::Ready(Err(why));
            }
            Verdict::Wait(d) => match w.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(Instant::now() + d),
                None => w.sleep = Some(Box::pin(tokio::time::sleep(d))),
            },
        }
    }
}

/// The client's request body on its way to the upstream.
pub(crate) struct RequestBody {
    inner: Incoming,
    /// Frames read before the call was forwarded (its limits read the
    /// first message), sent first.
    held: Option<VecDeque<Frame<Bytes>>>,
    /// Message limits on the client's messages, and messages they hold.
    meters: Option<Box<Meters>>,
    waiting: Option<Box<Waiting>>,
    observer: FrameObserver,
    state: Arc<CallState>,
    route: Arc<dyn RouteCounters>,
    /// The call's access log line, when it has one.
    record: Option<Arc<Record>>,
}

// === impl RequestBody ===

impl RequestBody {
    /// Observes `inner` for the call described by `state` and `route`.
    pub(crate) fn new(
        inner: Incoming,
        held: Option<VecDeque<Frame<Bytes>>>,
        meters: Option<Box<Meters>>,
        max: u32,
        compressed_ok: bool,
        state: Arc<CallState>,
        route: Arc<dyn RouteCounters>,
    ) -> Self {
        RequestBody {
            inner,
            held: held.filter(|h| !h.is_empty()),
            meters,
            waiting: None,
            observer: FrameObserver::new(max, compressed_ok),
            state,
            route,
            record: None,
        }
    }

    /// The same, adding its traffic to the call's access log line.
    pub(crate) fn with_record(mut self, record: Option<Arc<Record>>) -> Self {
        self.record = record;
        self
    }

    /// Ends the request over a message limit: the upstream stream is
    /// reset, the client told why by the response side.
    fn refuse(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state.set_limited(why.clone());
        Poll::Ready(Some(Err(BodyError::Limited(why))))
    }

    fn fail(&mut self, e: FrameError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state.set_request_error(e);
        Poll::Ready(Some(Err(BodyError::Frame(e))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.waiting.is_some() {
            return match ready!(poll_waiting(&mut this.waiting, &mut this.meters, cx)) {
                Ok(frame) => Poll::Ready(Some(Ok(frame))),
                Err(why) => this.refuse(why),
            };
        }
        let next = match this.held.as_mut().and_then(|h| h.pop_front()) {
            Some(frame) => {
                if this.held.as_ref().is_some_and(|h| h.is_empty()) {
                    this.held = None;
                }
                Some(Ok(frame))
            }
            None => ready!(Pin::new(&mut this.inner).poll_frame(cx)),
        };
        match next {
            Some(Ok(frame)) => {
                let mut messages = 0;
                if let Some(data) = frame.data_ref() {
                    this.state.mark_moved();
                    let before = this.observer.messages();
                    if let Err(e) = this.observer.observe(data) {
                        return this.fail(e);
                    }
                    messages = this.observer.messages() - before;
                }
                match meter(&mut this.meters, frame, messages, cx) {
                    Ok(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
                    Ok(Err(w)) => {
                        this.waiting = Some(w);
                        match ready!(poll_waiting(&mut this.waiting, &mut this.meters, cx)) {
                            Ok(frame) => Poll::Ready(Some(Ok(frame))),
                            Err(why) => this.refuse(why),
                        }
                    }
                    Err(why) => this.refuse(why),
                }
            }
            Some(Err(e)) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            None => match this.observer.finish() {
                Ok(()) => Poll::Ready(None),
                Err(e) => this.fail(e),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        // Mid-frame, the end is not the end: hyper must poll once more so the
        // truncation is reported instead of forwarded.
        self.held.is_none()
            && self.waiting.is_none()
            && self.inner.is_end_stream()
            && self.observer.finish().is_ok()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.held {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.route
            .stats()
            .messages_in
            .inc_by(self.observer.messages());
        self.route.stats().bytes_in.inc_by(self.observer.bytes());
        if let Some(r) = &self.record {
            r.request(self.observer.messages(), self.observer.bytes());
        }
    }
}

/// Counts a call once, when it ends.
pub(crate) struct Tally {
    stats: Arc<MethodStats>,
    start: Instant,
    recorded: bool,
    /// The call's access log line, when it has one.
    record: Option<Arc<Record>>,
}

impl Tally {
    /// Starts timing a call; also counts it as an open stream.
    pub(crate) fn start(stats: Arc<MethodStats>, start: Instant) -> Self {
        metrics::get().active_streams.inc();
        Tally {
            stats,
            start,
            recorded: false,
            record: None,
        }
    }

    /// The same, writing the call's access log line too.
    pub(crate) fn with_record(mut self, record: Option<Arc<Record>>) -> Self {
        self.record = record;
        self
    }

    /// The call's access log line, when it has one.
    pub(crate) fn record(&self) -> Option<&Arc<Record>> {
        self.record.as_ref()
    }

    /// Counts the call under other labels (its method turned out known).
    pub(crate) fn relabel(&mut self, stats: Arc<MethodStats>) {
        self.stats = stats;
    }

    /// Records the call's final status (None: the upstream gave none).
    pub(crate) fn finish(&mut self, status: Option<Code>) {
        if !self.recorded {
            self.recorded = true;
            self.stats.finished(status);
            self.stats
                .duration
                .observe(self.start.elapsed().as_secs_f64());
            if let Some(r) = &self.record {
                r.finished(status);
            }
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // Dropped before its end: the client went away.
        self.finish(Some(Code::Cancelled));
        metrics::get().active_streams.dec();
    }
}

/// The upstream's response body on its way to the client.
pub(crate) struct Proxied {
    inner: Option<h2::RecvStream>,
    /// All DATA frames were read; trailers (if any) come next.
    data_done: bool,
    observer: FrameObserver,
    /// Message limits on the upstream's messages, and messages they hold.
    meters: Option<Box<Meters>>,
    waiting: Option<Box<Waiting>>,
    /// Limits charged when the call ends.
    charges: Option<Box<Charges>>,
    state: Arc<CallState>,
    route: Arc<dyn RouteCounters>,
    timer: CallTimer,
    tally: Tally,
    done: bool,
    /// Counts the call as open on its connection until the response ends.
    open: Option<OpenCall>,
    /// Counts it as open on its upstream connection too; told how the
    /// call ended (outlier detection).
    upstream_open: OpenStream,
}

/// What tollgate sends back to the client.
#[derive(Default)]
pub(crate) enum ResponseBody {
    /// No body (trailers-only gRPC responses).
    #[default]
    Empty,
    /// A short fixed body (plain HTTP errors).
    Fixed(Option<Bytes>),
    /// A proxied gRPC response.
    Proxied(Box<Proxied>),
}

// === impl Proxied ===

impl Proxied {
    /// Observes the upstream's `inner` body.
    pub(crate) fn new(
        inner: h2::RecvStream,
        observer: FrameObserver,
        state: Arc<CallState>,
        route: Arc<dyn RouteCounters>,
        timer: CallTimer,
        tally: Tally,
        upstream_open: OpenStream,
    ) -> Self {
        Proxied {
            inner: Some(inner),
            data_done: false,
            observer,
            meters: None,
            waiting: None,
            charges: None,
            state,
            route,
            timer,
            tally,
            done: false,
            open: None,
            upstream_open,
        }
    }

    /// With message limits on the upstream's messages.
    pub(crate) fn with_meters(mut self, meters: Option<Box<Meters>>) -> Self {
        self.meters = meters;
        self
    }

    /// With limits charged when the call ends.
    pub(crate) fn with_charges(mut self, charges: Option<Box<Charges>>) -> Self {
        self.charges = charges;
        self
    }

    /// Ends the client's stream with tollgate's own status, dropping the
    /// upstream body (hyper resets the upstream stream).
    fn end_with(
        &mut self,
        code: Code,
        message: &str,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        self.inner = None;
        self.done = true;
        self.tally.finish(Some(code));
        Poll::Ready(Some(Ok(Frame::trailers(status_headers(code, message)))))
    }
}

impl ResponseBody {
    /// Keeps the call counted as open on its connection while this body
    /// streams; a body that is sent at once lets it go now.
    pub(crate) fn hold(&mut self, open: OpenCall) {
        if let ResponseBody::Proxied(p) = self {
            p.open = Some(open);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Proxied(p) => p.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Fixed(b) => b.is_none(),
            ResponseBody::Proxied(p) => p.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Fixed(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Fixed(None) => SizeHint::with_exact(0),
            ResponseBody::Proxied(_) => SizeHint::default(),
        }
    }
}

impl Proxied {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.timer.is_none() {
            if let Poll::Ready(why) = self.timer.poll_expired(&self.state, cx) {
                return self.end_with(Code::DeadlineExceeded, &why);
            }
        }
        let Some(inner) = self.inner.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        if self.waiting.is_some() {
            return match ready!(poll_waiting(&mut self.waiting, &mut self.meters, cx)) {
                Ok(frame) => Poll::Ready(Some(Ok(frame))),
                Err(why) => self.end_with(Code::ResourceExhausted, &why),
            };
        }
        if !self.data_done {
            match ready!(inner.poll_data(cx)) {
                Some(Ok(data)) => {
                    self.state.mark_moved();
                    // Pulled only when the client can take more, so giving
                    // the window back now keeps the two sides in step.
                    let _ = inner.flow_control().release_capacity(data.len());
                    let before = self.observer.messages();
                    if let Err(e) = self.observer.observe(&data) {
                        return self.end_with(e.code(), &format!("upstream response: {e}"));
                    }
                    let messages = self.observer.messages() - before;
                    return match meter(&mut self.meters, Frame::data(data), messages, cx) {
                        Ok(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
                        Ok(Err(w)) => {
                            self.waiting = Some(w);
                            match ready!(poll_waiting(&mut self.waiting, &mut self.meters, cx)) {
                                Ok(frame) => Poll::Ready(Some(Ok(frame))),
                                Err(why) => self.end_with(Code::ResourceExhausted, &why),
                            }
                        }
                        Err(why) => self.end_with(Code::ResourceExhausted, &why),
                    };
                }
                Some(Err(e)) => return self.upstream_failed(e),
                None => self.data_done = true,
            }
        }
        match ready!(inner.poll_trailers(cx)) {
            Ok(Some(trailers)) => {
                if let Err(e) = self.observer.finish() {
                    return self.end_with(Code::Internal, &format!("upstream response: {e}"));
                }
                let status = trailers.get("grpc-status").and_then(parse_status);
                if let Some(c) = self.charges.as_mut() {
                    c.settle(Some(&trailers), self.observer.messages());
                }
                self.done = true;
                self.upstream_open.settle(status == Some(Code::Unavailable));
                self.tally.finish(status);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Ok(None) => {
                if let Err(e) = self.observer.finish() {
                    return self.end_with(Code::Internal, &format!("upstream response: {e}"));
                }
                self.done = true;
                self.tally.finish(None);
                Poll::Ready(None)
            }
            Err(e) => self.upstream_failed(e),
        }
    }

    fn upstream_failed(&mut self, e: h2::Error) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(why) = self.state.limited() {
            return self.end_with(Code::ResourceExhausted, &why);
        }
        if let Some(fe) = self.state.request_error() {
            return self.end_with(fe.code(), &fe.to_string());
        }
        // The endpoint reset the call or lost its connection under it.
        self.upstream_open.settle(true);
        if !e.is_reset() && self.observer.finish().is_ok() {
            // The connection went away between messages: the call ends
            // with a status, as a client talking to the upstream directly
            // would see it.
            tracing::debug!(route = %self.route.stats().name(), error = %e, "upstream connection lost mid-call");
            let message = format!(
                "upstream {} closed its connection mid-call",
                self.route.upstream_name()
            );
            return self.end_with(Code::Unavailable, &message);
        }
        // The upstream reset the stream (or the connection broke inside a
        // message): reset the client's with the same code.
        self.done = true;
        self.tally.finish(None);
        Poll::Ready(Some(Err(e)))
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        if let Some(c) = self.charges.as_mut() {
            // Ended without trailers: what the upstream sent still counts.
            c.settle(None, self.observer.messages());
        }
        self.route
            .stats()
            .messages_out
            .inc_by(self.observer.messages());
        self.route.stats().bytes_out.inc_by(self.observer.bytes());
        if let Some(r) = self.tally.record() {
            r.response(self.observer.messages(), self.observer.bytes());
        }
    }
}
