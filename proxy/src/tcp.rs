//! How tollgate sets up its TCP connections, client and upstream alike.

use std::time::Duration;

use tokio::net::TcpStream;

/// No Nagle delay (gRPC frames are small and latency-bound), and TCP
/// keepalive probes after `idle` without traffic, then every 10 s, three
/// times: a peer that vanished without a FIN is found within
/// `idle` + 30 s.
pub(crate) fn tune(stream: &TcpStream, idle: Duration) -> socket2::SockRef<'_> {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3),
    );
    sock
}
