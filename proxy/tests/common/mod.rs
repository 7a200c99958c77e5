//! Test harness: a real tonic Echo service as the upstream, and tollgate
//! started in-process from a YAML config in a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod echo;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) use echo::{CostTrailer, EchoService, Seen};
pub(crate) use testkit::{eventually, http_get};
use tollgate::runtime::{self, Handle};
use tollgate_proto::test::v1::echo_client::EchoClient;
use tollgate_proto::test::v1::echo_server::EchoServer;
use tollgate_proto::test::v1::EchoRequest;
use tonic::transport::Channel;

/// A running Echo upstream.
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    // Read by the `it` tests only; `redis_outage` (its own process) shares
    // this module and has no use for it.
    #[allow(dead_code)]
    pub(crate) seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Upstream {
    pub(crate) async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub(crate) async fn start_on(addr: SocketAddr) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = EchoServer::new(EchoService { seen: seen.clone() })
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let counted = seen.clone();
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            move |c| {
                counted
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c
            },
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CostTrailer(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                }),
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
pub(crate) struct Proxy {
    pub(crate) handle: Option<Handle>,
    /// The config's folder, kept for as long as tollgate runs.
    // Read by the `it` tests only; `redis_outage` (its own process) shares
    // this module and has no use for it.
    #[allow(dead_code)]
    pub(crate) dir: tempfile::TempDir,
    // Read by the `it` tests only; `redis_outage` (its own process) shares
    // this module and has no use for it.
    #[allow(dead_code)]
    pub(crate) config_path: std::path::PathBuf,
}

impl Proxy {
    pub(crate) fn start(yaml: &str) -> Proxy {
        Proxy::start_with_env(yaml, &[])
    }

    /// [`Proxy::start`] with these environment variables (and no others).
    pub(crate) fn start_with_env(yaml: &str, vars: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        Proxy::start_file(dir, config_path, vars)
    }

    /// Starts on a config file the caller laid out in `dir`.
    pub(crate) fn start_file(
        dir: tempfile::TempDir,
        config_path: std::path::PathBuf,
        vars: &[(&str, &str)],
    ) -> Proxy {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        let handle = runtime::start(&config_path, &env).expect("tollgate starts");
        Proxy {
            handle: Some(handle),
            dir,
            config_path,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().listen_addr
    }

    pub(crate) fn admin(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().admin_addr
    }

    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr()))
            .unwrap()
            .connect()
            .await
            .expect("connect to tollgate")
    }

    pub(crate) async fn client(&self) -> EchoClient<Channel> {
        EchoClient::new(self.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub(crate) async fn metrics(&self) -> String {
        http_get(self.admin(), "/metrics").await.1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.begin_drain();
        }
    }
}

/// The value of the metric line starting with `series`, 0 if absent.
// Read by the `it` tests only.
#[allow(dead_code)]
pub(crate) fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}
