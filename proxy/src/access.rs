//! The access log: one line per routed call, JSON or `key=value` text.
//!
//! A sampled call carries a [`Record`] that the call path fills in as it
//! goes (the limit's outcome and time, the upstream endpoint and time, the
//! final status) and that its bodies add their bytes and messages to; the
//! line is written when the last of them lets it go, so it has both
//! directions whatever ends first. Lines go to a thread of their own
//! through a bounded queue: a full queue drops the line (counted in
//! `tollgate_access_log_dropped_total`), and a call never waits for a disk.
//!
//! A line carries no header value but those the config lists, never a
//! credential (`authorization`, `cookie`, … cannot be listed), and no value
//! longer than [`MOST`] bytes or with control characters as they came: values are
//! cut and escaped.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::SystemTime;

use http::{HeaderMap, HeaderName};
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::config::{self, AccessLogFormat};
use crate::grpc::status::Code;
use crate::trace::{CallSpans, Ended};

/// Longest header value (request id, listed headers) a line carries.
pub(crate) const MOST: usize = 256;

/// Lines waiting for the writer before more are dropped.
const QUEUE: usize = 16 * 1024;

/// Whether `name` carries credentials: never logged, and refused in
/// `access_log.headers`.
pub(crate) fn is_credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie" | "x-api-key"
    )
}

/// A loaded access log config and where its lines go.
pub(crate) struct AccessLog {
    out: SyncSender<String>,
    format: AccessLogFormat,
    /// A call is logged when its draw is below this (the sample × 2^64).
    threshold: u64,
    headers: Vec<HeaderName>,
    dropped: IntCounter,
}

/// One writer thread per destination, for the process: a reload that
/// keeps the path keeps it.
static WRITERS: LazyLock<Mutex<HashMap<Option<PathBuf>, SyncSender<String>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Draws for sampling.
static DRAWS: AtomicU64 = AtomicU64::new(0);

// === impl AccessLog ===

impl AccessLog {
    /// The log of a validated config; opens (or reuses) its destination.
    pub(crate) fn build(c: &config::AccessLog, base: Option<&Path>) -> Result<Self, String> {
        let path = c.path.as_ref().map(|p| config::resolve(p, base));
        let out = writer(path)?;
        let threshold = if c.sample >= 1.0 {
            u64::MAX
        } else {
            (c.sample.max(0.0) * u64::MAX as f64) as u64
        };
        Ok(AccessLog {
            out,
            format: c.format,
            threshold,
            headers: c
                .headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .filter(|h| !is_credential(h))
                .collect(),
            dropped: crate::metrics::get().access_log_dropped(),
        })
    }

    /// Whether a call that begins now is in the sample.
    fn sampled(&self) -> bool {
        self.threshold == u64::MAX
            || crate::upstream::splitmix(DRAWS.fetch_add(1, Ordering::Relaxed)) < self.threshold
    }
}

/// A record for a call that begins now, if the access log samples it or it
/// is traced (`spans`).
pub(crate) fn begin(
    log: Option<&Arc<AccessLog>>,
    spans: Option<Box<CallSpans>>,
    call: Call<'_>,
) -> Option<Arc<Record>> {
    let log = log.filter(|l| l.sampled()).cloned();
    if log.is_none() && spans.is_none() {
        return None;
    }
    let listed = log.as_ref().map_or_else(Vec::new, |log| {
        log.headers
            .iter()
            .filter_map(|name| Some((name.clone(), text(call.headers.get(name)?.as_bytes()))))
            .collect()
    });
    Some(Arc::new(Record {
        log,
        time: SystemTime::now(),
        start: call.start,
        route: call.route.clone(),
        upstream: call.upstream.clone(),
        path: format!("/{}/{}", cut(call.service), cut(call.method)).into(),
        peer: call.peer,
        request_id: call.headers.get("x-request-id").map(|v| text(v.as_bytes())),
        // A traced call's own trace (a new one has no traceparent until it
        // is sent); else the one its headers carry.
        trace_id: match &spans {
            Some(spans) => Some(spans.trace_id().into()),
            None => call
                .headers
                .get("traceparent")
                .and_then(|v| trace_id(v.as_bytes())),
        },
        headers: listed,
        limiter_us: AtomicU64::new(u64::MAX),
        redis_at_us: AtomicU64::new(u64::MAX),
        redis_us: AtomicU64::new(u64::MAX),
        upstream_us: AtomicU64::new(u64::MAX),
        total_us: AtomicU64::new(u64::MAX),
        status: AtomicI32::new(-1),
        limit: OnceLock::new(),
        endpoint: OnceLock::new(),
        request: Default::default(),
        response: Default::default(),
        spans: Mutex::new(spans),
    }))
}

/// What a call is when it begins.
pub(crate) struct Call<'a> {
    pub(crate) start: Instant,
    pub(crate) route: &'a Arc<str>,
    pub(crate) upstream: &'a Arc<str>,
    pub(crate) service: &'a str,
    pub(crate) method: &'a str,
    pub(crate) peer: IpAddr,
    pub(crate) headers: &'a HeaderMap,
}

/// Messages and bytes one way.
#[derive(Default)]
pub(crate) struct Flow {
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// One call's line and spans, filled in as the call goes; written and
/// ended when dropped.
pub(crate) struct Record {
    /// Where its line goes, when the access log samples it.
    log: Option<Arc<AccessLog>>,
    /// Its spans, when it is traced.
    spans: Mutex<Option<Box<CallSpans>>>,
    time: SystemTime,
    start: Instant,
    route: Arc<str>,
    upstream: Arc<str>,
    path: Box<str>,
    peer: IpAddr,
    request_id: Option<Box<str>>,
    trace_id: Option<Box<str>>,
    headers: Vec<(HeaderName, Box<str>)>,
    limiter_us: AtomicU64,
    /// When the limits' Redis round trip began, and how long it took.
    redis_at_us: AtomicU64,
    redis_us: AtomicU64,
    upstream_us: AtomicU64,
    total_us: AtomicU64,
    status: AtomicI32,
    limit: OnceLock<Box<str>>,
    endpoint: OnceLock<Arc<str>>,
    request: Flow,
    response: Flow,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("route", &self.route)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

// === impl Record ===

impl Record {
    /// µs since the call began.
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The call's limits begin.
    pub(crate) fn limiting(&self) {
        self.limiter_us.store(self.now(), Ordering::Relaxed);
    }

    /// The limits ended so: `allowed`, or `refused NAME`.
    pub(crate) fn limited(&self, outcome: &str) {
        let began = self.limiter_us.load(Ordering::Relaxed);
        let now = self.now();
        self.limiter_us
            .store(now.saturating_sub(began), Ordering::Relaxed);
        let outcome = cut(outcome);
        if let Some(spans) = self.spans.lock().ok().as_deref().and_then(Option::as_deref) {
            let redis = match self.redis_us.load(Ordering::Relaxed) {
                u64::MAX => None,
                took => {
                    let at = self.redis_at_us.load(Ordering::Relaxed);
                    Some((self.at(at), self.at(at + took)))
                }
            };
            spans.limited(self.at(began), self.at(now), redis, outcome);
        }
        let _ = self.limit.set(outcome.into());
    }

    /// The limits asked Redis, from `began` until now.
    pub(crate) fn redis_round_trip(&self, began: Instant) {
        let at = began.saturating_duration_since(self.start).as_micros() as u64;
        self.redis_at_us.store(at, Ordering::Relaxed);
        self.redis_us
            .store(began.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// The wall-clock time `us` after the call began.
    fn at(&self, us: u64) -> SystemTime {
        self.time + std::time::Duration::from_micros(us)
    }

    /// The call is about to go upstream: a traced one's `traceparent` names
    /// its upstream span.
    pub(crate) fn sending(&self, headers: &mut HeaderMap) {
        if let Some(spans) = self
            .spans
            .lock()
            .ok()
            .as_deref_mut()
            .and_then(Option::as_deref_mut)
        {
            spans.sending(headers, &self.upstream);
        }
    }

    /// The call is sent upstream.
    pub(crate) fn sent(&self) {
        self.upstream_us.store(self.now(), Ordering::Relaxed);
    }

    /// The upstream answered from `endpoint`.
    pub(crate) fn answered(&self, endpoint: Arc<str>) {
        let sent = self.upstream_us.load(Ordering::Relaxed);
        self.upstream_us
            .store(self.now().saturating_sub(sent), Ordering::Relaxed);
        let _ = self.endpoint.set(endpoint);
    }

    /// The call ended with `status` (None: the upstream gave none).
    pub(crate) fn finished(&self, status: Option<Code>) {
        let us = self.start.elapsed().as_micros() as u64;
        let _ = self
            .total_us
            .compare_exchange(u64::MAX, us, Ordering::Relaxed, Ordering::Relaxed);
        let code = status.map_or(-2, |c| c as i32);
        let _ = self
            .status
            .compare_exchange(-1, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The client's messages and bytes (frame headers included).
    pub(crate) fn request(&self, messages: u64, bytes: u64) {
        self.request.messages.fetch_add(messages, Ordering::Relaxed);
        self.request.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The upstream's messages and bytes.
    pub(crate) fn response(&self, messages: u64, bytes: u64) {
        self.response
            .messages
            .fetch_add(messages, Ordering::Relaxed);
        self.response.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn fields(&self) -> [(&'static str, Value<'_>); 17] {
        fn opt(s: Option<&str>) -> Value<'_> {
            s.map_or(Value::None, Value::Str)
        }
        let ms = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
            u64::MAX => Value::None,
            us => Value::Ms(us),
        };
        let status = match self.status.load(Ordering::Relaxed) {
            -1 => Value::Str("CANCELLED"),
            -2 => Value::None,
            c => Value::Str(crate::grpc::status::code_of(c).map_or("UNKNOWN", |c| c.name())),
        };
        let int = |a: &AtomicU64| Value::Int(a.load(Ordering::Relaxed));
        [
            ("time", Value::Time(self.time)),
            ("route", Value::Str(&self.route)),
            ("method", Value::Str(&self.path)),
            ("grpc_status", status),
            ("duration_ms", ms(&self.total_us)),
            ("limiter_ms", ms(&self.limiter_us)),
            ("upstream_ms", ms(&self.upstream_us)),
            ("upstream", Value::Str(&self.upstream)),
            ("endpoint", opt(self.endpoint.get().map(|e| &**e))),
            ("limit", opt(self.limit.get().map(|l| &**l))),
            ("request_messages", int(&self.request.messages)),
            ("request_bytes", int(&self.request.bytes)),
            ("response_messages", int(&self.response.messages)),
            ("response_bytes", int(&self.response.bytes)),
            ("peer", Value::Ip(self.peer.to_canonical())),
            ("request_id", opt(self.request_id.as_deref())),
            ("trace_id", opt(self.trace_id.as_deref())),
        ]
    }

    /// The line, written straight into one string.
    fn line(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(512);
        let json = self
            .log
            .as_ref()
            .is_none_or(|l| l.format == AccessLogFormat::Json);
        if json {
            s.push('{');
        }
        let mut first = true;
        let mut key = |s: &mut String, k: &str| {
            if !first {
                s.push(if json { ',' } else { ' ' });
            }
            first = false;
            if json {
                s.push('"');
                s.push_str(k);
                s.push_str("\":");
            } else {
                s.push_str(k);
                s.push('=');
            }
        };
        for (k, v) in self.fields() {
            match v {
                Value::None => continue,
                Value::Str(v) => {
                    key(&mut s, k);
                    quoted(&mut s, v, json);
                }
                Value::Int(n) => {
                    key(&mut s, k);
                    let _ = write!(s, "{n}");
                }
                Value::Ms(us) => {
                    key(&mut s, k);
                    let _ = write!(s, "{}.{:03}", us / 1000, us % 1000);
                }
                Value::Time(t) => {
                    key(&mut s, k);
                    let _ = if json {
                        write!(s, "\"{}\"", humantime::format_rfc3339_millis(t))
                    } else {
                        write!(s, "{}", humantime::format_rfc3339_millis(t))
                    };
                }
                Value::Ip(ip) => {
                    key(&mut s, k);
                    let _ = if json {
                        write!(s, "\"{ip}\"")
                    } else {
                        write!(s, "{ip}")
                    };
                }
            }
        }
        if json {
            if !self.headers.is_empty() {
                key(&mut s, "headers");
                s.push('{');
                for (i, (n, v)) in self.headers.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    quoted(&mut s, n.as_str(), true);
                    s.push(':');
                    quoted(&mut s, v, true);
                }
                s.push('}');
            }
            s.push('}');
        } else {
            for (n, v) in &self.headers {
                s.push_str(" header.");
                s.push_str(n.as_str());
                s.push('=');
                s.push('"');
                escape(&mut s, v);
                s.push('"');
            }
        }
        s.push('\n');
        s
    }
}

/// `v` as a JSON string, or as a text value (quoted when it must be).
fn quoted(s: &mut String, v: &str, json: bool) {
    let plain = !json
        && !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '=' | '\\'));
    if plain {
        s.push_str(v);
        return;
    }
    s.push('"');
    escape(s, v);
    s.push('"');
}

/// Escapes `v` for the inside of a JSON string (quotes, backslashes and
/// control characters), which text values use too.
fn escape(s: &mut String, v: &str) {
    use std::fmt::Write as _;
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            // Control characters (C0, DEL, C1) and the Unicode line
            // separators: never a line break inside a line.
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            match log.out.try_send(self.line()) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => log.dropped.inc(),
            }
        }
        let spans = self.spans.get_mut().ok().and_then(Option::take);
        if let Some(spans) = spans {
            let end = match self.total_us.load(Ordering::Relaxed) {
                u64::MAX => SystemTime::now(),
                us => self.at(us),
            };
            let status = match self.status.load(Ordering::Relaxed) {
                -1 => None,
                -2 => Some(Code::Unknown),
                c => Some(crate::grpc::status::code_of(c).unwrap_or(Code::Unknown)),
            };
            let flow = |f: &Flow| {
                (
                    f.messages.load(Ordering::Relaxed),
                    f.bytes.load(Ordering::Relaxed),
                )
            };
            spans.end(Ended {
                end,
                status,
                limit: self.limit.get().map(|l| &**l),
                endpoint: self.endpoint.get().map(|e| &**e),
                request: flow(&self.request),
                response: flow(&self.response),
            });
        }
    }
}

enum Value<'a> {
    None,
    Str(&'a str),
    Int(u64),
    Ms(u64),
    Time(SystemTime),
    Ip(IpAddr),
}

/// A header value as a line may carry it: at most [`MOST`] bytes, invalid
/// UTF-8 replaced; control characters are escaped when written.
fn text(v: &[u8]) -> Box<str> {
    let v = &v[..v.len().min(MOST)];
    String::from_utf8_lossy(v).into()
}

/// At most [`MOST`] bytes of `s`, on a character boundary.
pub(crate) fn cut(s: &str) -> &str {
    if s.len() <= MOST {
        return s;
    }
    let mut end = MOST;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The trace id of a valid W3C `traceparent`, or None.
pub(crate) fn trace_id(v: &[u8]) -> Option<Box<str>> {
    crate::trace::parse(v).map(|p| p.trace.to_string().into())
}

/// The queue to the writer of `path` (standard output when None).
fn writer(path: Option<PathBuf>) -> Result<SyncSender<String>, String> {
    let mut all = WRITERS
        .lock()
        .map_err(|_| "the access log writers are unusable".to_owned())?;
    if let Some(tx) = all.get(&path) {
        return Ok(tx.clone());
    }
    let file = match &path {
        None => None,
        Some(p) => Some(open(p)?),
    };
    let (tx, rx) = sync_channel(QUEUE);
    let at = path.clone();
    std::thread::Builder::new()
        .name("tollgate-access-log".into())
        .spawn(move || write_lines(rx, at, file))
        .map_err(|e| format!("access_log: cannot start its writer: {e}"))?;
    all.insert(path, tx.clone());
    Ok(tx)
}

fn open(p: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| format!("access_log.path {}: {e}", p.display()))
}

/// Writes what has come every [`FLUSH`]: the writer never sleeps in the
/// queue, so a call's send never has to wake it. A file moved away (log
/// rotation) or removed is opened anew under its path within a second.
fn write_lines(rx: Receiver<String>, path: Option<PathBuf>, mut file: Option<std::fs::File>) {
    use std::os::unix::fs::MetadataExt;
    let dropped = crate::metrics::get().access_log_dropped();
    let mut batch = String::new();
    for round in 0u64.. {
        std::thread::sleep(FLUSH);
        let mut lines = 0;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    batch.push_str(&line);
                    lines += 1;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
        if let (Some(p), true) = (&path, round % 50 == 0) {
            let moved = match (std::fs::metadata(p), file.as_ref().map(|f| f.metadata())) {
                (Ok(now), Some(Ok(open))) => now.ino() != open.ino() || now.dev() != open.dev(),
                _ => true,
            };
            if moved {
                match open(p) {
                    Ok(f) => file = Some(f),
                    Err(e) => {
                        tracing::warn!(error = %e, "access log: cannot reopen its file; lines are dropped until it can")
                    }
                }
            }
        }
        if lines == 0 {
            continue;
        }
        let written = match &mut file {
            Some(f) => f.write_all(batch.as_bytes()),
            None if path.is_none() => std::io::stdout().lock().write_all(batch.as_bytes()),
            None => Err(std::io::Error::other("no file")),
        };
        if written.is_err() {
            dropped.inc_by(lines);
        }
        batch.clear();
    }
}

/// How often the writer writes what has come.
const FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_is_that_of_a_valid_traceparent() {
        // The parsing itself is trace.rs's, tested there.
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(good.as_bytes()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(b"garbage"), None);
    }

    #[test]
    fn values_are_escaped_as_json_and_quoted_in_text_when_they_must_be() {
        let nasty = "a \"b\" \\ c\nd\u{1}\u{7f}é";
        let mut json = String::new();
        quoted(&mut json, nasty, true);
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), nasty);
        let mut text = String::new();
        quoted(&mut text, "plain-value", false);
        assert_eq!(text, "plain-value");
        let mut text = String::new();
        quoted(&mut text, "two words", false);
        assert_eq!(text, "\"two words\"");
        let mut text = String::new();
        quoted(&mut text, "line\nbreak", false);
        assert_eq!(text, "\"line\\nbreak\"", "never a raw line break in a line");
    }

    #[test]
    fn values_are_cut_and_never_credentials() {
        assert_eq!(text(&[b'a'; 1000]).len(), MOST);
        assert_eq!(&*text(b"ok\xff"), "ok\u{fffd}");
        assert!(is_credential(&HeaderName::from_static("authorization")));
        assert!(!is_credential(&HeaderName::from_static("x-merchant-id")));
        let s = "é".repeat(200);
        assert!(cut(&s).len() <= MOST);
    }
}
