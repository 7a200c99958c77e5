//! The benchmark upstream: the `tollgate.test.v1.Echo` service alone, on an
//! address given as the first argument (default 127.0.0.1:50061).
//!
//! ```text
//! cargo run --release -p tollgate --example echo_upstream -- 127.0.0.1:50061
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub, dead_code)]

#[path = "../tests/common/echo.rs"]
mod echo;

use tollgate_proto::test::v1::echo_server::EchoServer;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50061".into())
        .parse()
        .expect("usage: echo_upstream HOST:PORT");
    let svc = EchoServer::new(echo::EchoService {
        seen: Default::default(),
    });
    eprintln!("echo upstream on {addr}");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_max_pending_accept_reset_streams(Some(10_000))
        .add_service(svc)
        .serve(addr)
        .await
        .expect("serve");
}
