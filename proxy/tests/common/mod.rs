//! Test harness: a real tonic Echo service as the upstream, and tollgate
//! started in-process from a YAML config in a temp dir.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tollgate::runtime::{self, Handle};
use tollgate_proto::test::v1::echo_client::EchoClient;
use tollgate_proto::test::v1::echo_server::{Echo, EchoServer};
use tollgate_proto::test::v1::{EchoReply, EchoRequest};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// What the upstream saw.
#[derive(Default)]
pub struct Seen {
    /// Server streams whose client went away before the end.
    pub cancelled: AtomicUsize,
    /// Calls that reached the upstream.
    pub calls: AtomicUsize,
}

#[derive(Clone)]
pub struct EchoService {
    pub seen: Arc<Seen>,
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

/// A running Echo upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = EchoServer::new(EchoService { seen: seen.clone() })
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        Upstream {
            addr,
            seen,
            stop: Some(tx),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// tollgate running in-process.
pub struct Proxy {
    pub handle: Option<Handle>,
    pub dir: tempfile::TempDir,
    pub config_path: std::path::PathBuf,
}

/// The YAML of a proxy with one upstream `echo` at `upstream` and a
/// catch-all route to it; `extra` is appended (more routes, upstreams …).
pub fn basic_config(upstream: SocketAddr) -> String {
    named_config(upstream, "*")
}

/// [`basic_config`] with the catch-all route named `name` (metrics are
/// process-wide: a test that counts uses a name of its own).
pub fn named_config(upstream: SocketAddr, name: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{upstream}\"], connect_timeout: 500ms }}\nroutes:\n  - {{ match: {{}}, upstream: echo, name: \"{name}\" }}\n"
    )
}

impl Proxy {
    pub fn start(yaml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let env: HashMap<&str, &str> = HashMap::new();
        let handle = runtime::start(&config_path, &env).expect("tollgate starts");
        Proxy {
            handle: Some(handle),
            dir,
            config_path,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().listen_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().admin_addr
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr()))
            .unwrap()
            .connect()
            .await
            .expect("connect to tollgate")
    }

    pub async fn client(&self) -> EchoClient<Channel> {
        EchoClient::new(self.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin(), "/metrics").await.1
    }

    /// Drains (blocking work off the runtime).
    pub async fn drain(&mut self) {
        if let Some(h) = self.handle.take() {
            tokio::task::spawn_blocking(move || h.drain())
                .await
                .unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.begin_drain();
        }
    }
}

/// A plain HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
