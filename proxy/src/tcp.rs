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
    let _ = sock.set_tcp_keepalive(&keepalive(idle));
    sock
}

/// The keepalive probes of [`tune`].
fn keepalive(idle: Duration) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// The same for the limiter's Redis connections, which the redis crate
/// opens itself (its default leaves Nagle on): a worker keeps up to four
/// batches in flight on one connection, and with Nagle each batch written
/// while the one before is unacknowledged would wait for that ACK.
pub(crate) fn redis() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive(Duration::from_secs(60)))
}
