//! The Echo test service (`tollgate.test.v1.Echo`): every call kind,
//! delays, chosen failures, and what the server saw. Shared by the tests and
//! the benchmark upstream (`examples/echo_upstream.rs`).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tollgate_proto::test::v1::echo_server::Echo;
use tollgate_proto::test::v1::{EchoReply, EchoRequest};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

/// What the upstream saw.
#[derive(Default)]
pub(crate) struct Seen {
    /// Server streams whose client went away before the end.
    pub(crate) cancelled: AtomicUsize,
    /// Calls that reached the upstream.
    pub(crate) calls: AtomicUsize,
    /// TCP connections the upstream accepted.
    pub(crate) connections: AtomicUsize,
    /// The metadata of the last unary call.
    pub(crate) last: std::sync::Mutex<Option<MetadataMap>>,
}

#[derive(Clone)]
pub(crate) struct EchoService {
    pub(crate) seen: Arc<Seen>,
}

fn echo_metadata(from: &MetadataMap, to: &mut MetadataMap) {
    for kv in from.iter() {
        match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo") => {
                to.insert(k.clone(), v.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo") => {
                to.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

fn reply(req: &EchoRequest, received: u32, received_bytes: u64, md: &MetadataMap) -> EchoReply {
    EchoReply {
        payload: if req.reply_bytes > 0 {
            vec![7u8; req.reply_bytes as usize]
        } else {
            req.payload.clone()
        },
        received,
        received_bytes,
        forwarded_for: md
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        grpc_timeout: md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    }
}

fn failure(req: &EchoRequest) -> Option<Status> {
    if req.fail_code == 0 {
        return None;
    }
    let mut md = MetadataMap::new();
    md.insert("x-trailer", MetadataValue::from_static("trailer-value"));
    md.insert_bin("x-trailer-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    Some(Status::with_details_and_metadata(
        tonic::Code::from_i32(req.fail_code),
        req.fail_message.clone(),
        bytes::Bytes::from_static(b"\x08\x03details"),
        md,
    ))
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let md = request.metadata().clone();
        if let Ok(mut last) = self.seen.last.lock() {
            *last = Some(md.clone());
        }
        let req = request.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        if let Some(s) = failure(&req) {
            return Err(s);
        }
        let mut resp = Response::new(reply(&req, 1, req.payload.len() as u64, &md));
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let md = request.metadata().clone();
        let mut stream = request.into_inner();
        let (mut n, mut bytes, mut last) = (0u32, 0u64, EchoRequest::default());
        while let Some(m) = stream.next().await {
            let m = m?;
            n += 1;
            bytes += m.payload.len() as u64;
            last = m;
        }
        last.payload.clear();
        Ok(Response::new(reply(&last, n, bytes, &md)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let md = request.metadata().clone();
        let req = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            for i in 0..req.count {
                if req.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
                }
                if tx.send(Ok(reply(&req, i + 1, 0, &md))).await.is_err() {
                    seen.cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            if let Some(s) = failure(&req) {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let md = request.metadata().clone();
        let mut stream = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let (mut n, mut bytes) = (0u32, 0u64);
            while let Some(m) = stream.next().await {
                let Ok(m) = m else { return };
                n += 1;
                bytes += m.payload.len() as u64;
                if tx.send(Ok(reply(&m, n, bytes, &md))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A service behind a layer that reports what each call cost, as an
/// upstream of limits charged after the call does: a call sent with
/// `x-charge: N` ends with trailer `x-cost: N` (success or failure).
#[derive(Clone)]
pub(crate) struct CostTrailer<S>(pub(crate) S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for CostTrailer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for CostTrailer<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cost = req.headers().get("x-charge").cloned();
        let answer = self.0.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(match cost {
                None => response,
                Some(cost) => response.map(|inner| {
                    tonic::body::Body::new(WithCost {
                        inner,
                        cost: Some(cost),
                    })
                }),
            })
        })
    }
}

/// A response body whose trailers gain `x-cost`.
struct WithCost {
    inner: tonic::body::Body,
    cost: Option<http::HeaderValue>,
}

impl http_body::Body for WithCost {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        std::task::Poll::Ready(frame.map(|f| {
            f.map(|f| match f.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(cost) = self.cost.take() {
                        trailers.insert("x-cost", cost);
                    }
                    http_body::Frame::trailers(trailers)
                }
                Err(f) => f,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
