//! The owner watchdog of the scripts: a service started with `--owner PID`
//! stops (and with `--cleanup` its directory goes) once PID has exited.

use std::process::Command;
use std::time::{Duration, Instant};

fn script(name: &str) -> String {
    format!("{}/../scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn service_dies_with_its_owner() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = tmp.path().join("redis");
    let mut owner = Command::new("sleep")
        .arg("2")
        .spawn()
        .unwrap_or_else(|e| panic!("could not spawn sleep: {e}"));
    let output = Command::new("bash")
        .arg(script("redis.sh"))
        .arg("start")
        .arg(&dir)
        .args(["--owner", &owner.id().to_string(), "--cleanup"])
        .output()
        .unwrap_or_else(|e| panic!("could not run redis.sh: {e}"));
    assert!(
        output.status.success(),
        "redis.sh start failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let port: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PORT="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PORT= line in {stdout:?}"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    owner
        .wait()
        .unwrap_or_else(|e| panic!("wait for sleep: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "redis on {port} still up 10 s after its owner exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
