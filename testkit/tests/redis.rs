//! Redis and Redis Cluster through the harness, checked with redis-cli.

use std::process::Command;
use std::time::Instant;

use testkit::{Redis, RedisCluster};

fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map_err(|e| format!("could not run redis-cli: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    // redis-cli exits 0 on some errors; it says so on stdout or stderr.
    if output.status.success() && !stdout.starts_with("Could not connect") {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn redis_start_ping_stop_start_again() {
    let started = Instant::now();
    let redis = Redis::start();
    eprintln!("Redis::start took {:?}", started.elapsed());
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(redis_cli(redis.port(), &["ping"]).as_deref(), Ok("PONG"));
    assert_eq!(
        redis_cli(redis.port(), &["set", "k", "v"]).as_deref(),
        Ok("OK")
    );

    redis.stop();
    assert!(
        redis_cli(redis.port(), &["ping"]).is_err(),
        "still answers after stop"
    );
    let started = Instant::now();
    redis.start_again();
    eprintln!("Redis::start_again took {:?}", started.elapsed());
    assert_eq!(redis_cli(redis.port(), &["ping"]).as_deref(), Ok("PONG"));
    // Nothing is persisted.
    assert_eq!(redis_cli(redis.port(), &["get", "k"]).as_deref(), Ok(""));
}

#[test]
fn redis_shared_and_drop() {
    let shared = Redis::shared();
    assert!(std::ptr::eq(shared, Redis::shared()));
    assert_eq!(redis_cli(shared.port(), &["ping"]).as_deref(), Ok("PONG"));

    let redis = Redis::start();
    let (port, dir) = (redis.port(), redis.dir().to_path_buf());
    drop(redis);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        redis_cli(port, &["ping"]).is_err(),
        "still answers after drop"
    );
}

#[test]
fn cluster_start_use_stop_start_again() {
    let started = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("RedisCluster::start took {:?}", started.elapsed());
    assert_eq!(cluster.urls().len(), 3);
    for (url, port) in cluster.urls().iter().zip(cluster.ports()) {
        assert_eq!(url, &format!("redis://127.0.0.1:{port}"));
        let info = redis_cli(*port, &["cluster", "info"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
    }
    let port = cluster.ports()[0];
    for key in ["a", "b", "c", "d", "e", "f"] {
        assert_eq!(
            redis_cli(port, &["-c", "set", key, key]).as_deref(),
            Ok("OK")
        );
        assert_eq!(redis_cli(port, &["-c", "get", key]).as_deref(), Ok(key));
    }

    cluster.stop();
    assert!(
        redis_cli(port, &["ping"]).is_err(),
        "still answers after stop"
    );
    let started = Instant::now();
    cluster.start_again();
    eprintln!("RedisCluster::start_again took {:?}", started.elapsed());
    assert_eq!(
        redis_cli(port, &["-c", "set", "a", "1"]).as_deref(),
        Ok("OK")
    );
}

#[test]
fn cluster_shared() {
    let cluster = RedisCluster::shared();
    assert!(std::ptr::eq(cluster, RedisCluster::shared()));
    let info =
        redis_cli(cluster.ports()[1], &["cluster", "info"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(info.contains("cluster_state:ok"), "{info}");
}
