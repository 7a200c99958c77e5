//! PostgreSQL through the harness: start, query with psql, stop, start again.

use std::process::Command;
use std::time::Instant;

use testkit::Postgres;

fn psql_url(url: &str, sql: &str) -> Result<String, String> {
    let output = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("could not run psql: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn start_query_stop_start_again() {
    let started = Instant::now();
    let pg = Postgres::start();
    eprintln!("Postgres::start took {:?}", started.elapsed());
    assert!(pg.url().starts_with("postgres://app:"), "url {}", pg.url());
    assert!(pg
        .url()
        .ends_with(&format!("@127.0.0.1:{}/postgres", pg.port())));
    assert_eq!(psql_url(pg.url(), "select 1").as_deref(), Ok("1"));
    assert_eq!(pg.psql("postgres", "show fsync"), "off");
    assert_eq!(pg.psql("postgres", "show max_connections"), "200");

    let ledger = pg.create_database("ledger");
    assert!(ledger.ends_with("/ledger"), "database url {ledger}");
    assert_eq!(
        psql_url(
            &ledger,
            "create table t (x int); insert into t values (42); select x from t"
        )
        .as_deref(),
        Ok("42")
    );

    pg.stop();
    assert!(
        psql_url(pg.url(), "select 1").is_err(),
        "still answers after stop"
    );
    let started = Instant::now();
    pg.start_again();
    eprintln!("Postgres::start_again took {:?}", started.elapsed());
    assert_eq!(psql_url(&ledger, "select x from t").as_deref(), Ok("42"));
}

#[test]
fn durable_mode_keeps_fsync_on() {
    let pg = Postgres::start_durable();
    assert_eq!(pg.psql("postgres", "show fsync"), "on");
    assert_eq!(pg.psql("postgres", "show synchronous_commit"), "on");
}

#[test]
fn shared_is_one_server() {
    let a = Postgres::shared();
    let b = Postgres::shared();
    assert!(std::ptr::eq(a, b));
    assert_eq!(psql_url(a.url(), "select 2").as_deref(), Ok("2"));
}

#[test]
fn drop_stops_and_removes() {
    let pg = Postgres::start();
    let dir = pg.dir().to_path_buf();
    let url = pg.url().to_owned();
    drop(pg);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        psql_url(&url, "select 1").is_err(),
        "still answers after drop"
    );
}
