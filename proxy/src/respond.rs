//! How tollgate answers a call it ends itself. Every reason is one
//! [`CallError`]; [`CallError::code`] is the gRPC status it counts as and
//! [`CallError::into_response`] the answer the client gets:
//!
//! ```text
//! not HTTP/2, not POST, not application/grpc ─▶ an HTTP status and a one-line reason
//! everything else                             ─▶ trailers-only: HTTP 200, grpc-status,
//!                                                grpc-message (and a limit's own headers)
//! ```

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::{ResponseBody, Tally};
use crate::grpc::frame::FrameError;
use crate::grpc::status::{trailers_only, Code};
use crate::limit::Rejection;
use crate::metrics;
use crate::upstream::UpstreamError;

/// Why tollgate answers a call itself instead of the upstream.
#[derive(Debug)]
pub(crate) enum CallError {
    /// An HTTP/1 request: gRPC needs HTTP/2.
    Http1,
    /// A method other than POST.
    NotPost,
    /// A content type other than `application/grpc*`.
    NotGrpc,
    /// A path that is not `/package.Service/Method`.
    MalformedPath,
    /// No route takes the call (`/service/method`).
    NoRoute(String),
    /// A malformed or repeated `grpc-timeout` (what is wrong, not the value).
    BadTimeout(&'static str),
    /// A limit refused the call.
    Limited(Box<Rejection>),
    /// The call's deadline (or the stream idle timeout) ran out.
    DeadlineExceeded(Cow<'static, str>),
    /// The client's framing was refused.
    Frame(FrameError),
    /// The upstream could not take or finish the call.
    Upstream(UpstreamError),
    /// The upstream URI could not be built from the request's.
    UpstreamUri,
    /// The client reset the call before tollgate forwarded it.
    Cancelled,
}

// === impl CallError ===

impl CallError {
    /// The gRPC status the call ends with; `None` for a request that is not
    /// gRPC at all (answered with an HTTP status).
    pub(crate) fn code(&self) -> Option<Code> {
        Some(match self {
            CallError::Http1 | CallError::NotPost | CallError::NotGrpc => return None,
            CallError::MalformedPath | CallError::NoRoute(_) => Code::Unimplemented,
            CallError::BadTimeout(_) => Code::InvalidArgument,
            CallError::Limited(r) => r.code,
            CallError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CallError::Frame(e) => e.code(),
            CallError::Upstream(e) => e.code(),
            CallError::UpstreamUri => Code::Internal,
            CallError::Cancelled => Code::Cancelled,
        })
    }

    /// The response the client gets.
    pub(crate) fn into_response(self) -> Response<ResponseBody> {
        match self {
            CallError::Http1 => http1_refusal(),
            CallError::NotPost => {
                let mut r = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "tollgate forwards gRPC only: POST with content-type application/grpc\n",
                );
                r.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
                r
            }
            CallError::NotGrpc => plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "tollgate forwards gRPC only: content-type must be application/grpc\n",
            ),
            CallError::MalformedPath => trailers_only(
                Code::Unimplemented,
                "malformed gRPC path: expected /package.Service/Method",
            ),
            CallError::NoRoute(path) => {
                trailers_only(Code::Unimplemented, &format!("no route for {path}"))
            }
            CallError::BadTimeout(why) => trailers_only(Code::InvalidArgument, why),
            CallError::Limited(rejection) => {
                let Rejection {
                    code,
                    message,
                    headers,
                    ..
                } = *rejection;
                let mut r: Response<ResponseBody> = trailers_only(code, &message);
                r.headers_mut().extend(headers);
                r
            }
            CallError::DeadlineExceeded(why) => trailers_only(Code::DeadlineExceeded, &why),
            CallError::Frame(e) => trailers_only(e.code(), &e.to_string()),
            CallError::Upstream(e) => {
                let (code, message) = e.status();
                let mut r = trailers_only(code, &message);
                if let Some(ms) = e.retry_pushback_ms() {
                    // gRFC A6: when the client's retry policy may retry.
                    r.headers_mut()
                        .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
                }
                r
            }
            CallError::UpstreamUri => {
                trailers_only(Code::Internal, "cannot build the upstream URI")
            }
            CallError::Cancelled => trailers_only(Code::Cancelled, "the client cancelled the call"),
        }
    }

    /// Counts the call under its status in `tally`, then answers it.
    pub(crate) fn answer(self, mut tally: Tally) -> Response<ResponseBody> {
        tally.finish(self.code());
        self.into_response()
    }
}

/// The answer to an HTTP/1 request: 505 with the reason.
pub(crate) fn http1_refusal() -> Response<ResponseBody> {
    let mut r = plain(
        StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        "tollgate forwards gRPC, which needs HTTP/2: use h2c (prior knowledge) or TLS with ALPN h2\n",
    );
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A plain-text HTTP answer, counted as a request that was not gRPC.
fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    metrics::get().non_grpc(status.as_u16());
    let mut r = Response::new(ResponseBody::Fixed(Some(Bytes::from_static(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
