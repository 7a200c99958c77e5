//! The tansu broker through the harness: topics, stop, start again.

use std::process::Command;
use std::time::Instant;

use testkit::Kafka;

/// Topic names as the scripts' `list` command prints them.
fn list_topics(kafka: &Kafka) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka.sh");
    let output = Command::new("bash")
        .arg(script)
        .arg("list")
        .arg(kafka.dir())
        .output()
        .unwrap_or_else(|e| panic!("could not run {script}: {e}"));
    assert!(
        output.status.success(),
        "kafka.sh list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn topics_are_recreated_after_restart() {
    let started = Instant::now();
    let kafka = Kafka::start();
    eprintln!("Kafka::start took {:?}", started.elapsed());
    assert_eq!(kafka.brokers(), format!("127.0.0.1:{}", kafka.port()));

    kafka.create_topic("payments.events", 3);
    kafka.create_topic("payments.events", 3); // already there: fine
    kafka.create_topic("audit", 1);
    let mut topics = list_topics(&kafka);
    topics.sort();
    assert_eq!(topics, ["audit", "payments.events"]);
    assert_eq!(kafka.topics().len(), 2);

    kafka.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", kafka.port())).is_err(),
        "still accepts after stop"
    );
    let started = Instant::now();
    kafka.start_again();
    eprintln!("Kafka::start_again took {:?}", started.elapsed());
    let mut topics = kafka.topics();
    topics.sort();
    assert_eq!(topics, ["audit", "payments.events"]);
}

#[test]
fn shared_and_drop() {
    let shared = Kafka::shared();
    assert!(std::ptr::eq(shared, Kafka::shared()));
    shared.create_topic("shared-topic", 2);
    assert!(shared.topics().contains(&"shared-topic".to_owned()));

    let kafka = Kafka::start();
    let (port, dir) = (kafka.port(), kafka.dir().to_path_buf());
    drop(kafka);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
