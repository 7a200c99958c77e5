//! The Redis limit store against a real redis-server and a real 3-master
//! Redis Cluster: the behaviour table every backend passes (with the
//! script's injected clock), one round trip per call whatever the number of
//! limits, all-or-nothing commits, and the circuit breaker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tollgate::config::Rate;
use tollgate::config::{Backend, Dur, Limiter, RedisStore as RedisSettings};
use tollgate::limit::algorithm::{self, Algorithm, Calendar, Params};
use tollgate::limit::check::{self, Check};
use tollgate::limit::redis::{RedisStore, StoreError};

/// The table every limit backend passes; it reads `super::algorithm` and
/// `super::Rate` from here.
#[path = "../../src/limit/behaviour.rs"]
mod behaviour;
use behaviour::{behaviour_table, cases, check_step, ALIGNED_START};

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

fn single(url: &str, timeout: Duration) -> RedisStore {
    prefixed(url, timeout, &unique("t"))
}

/// A store on one Redis whose keys start with `prefix` (to read them).
fn prefixed(url: &str, timeout: Duration, prefix: &str) -> RedisStore {
    let limiter = Limiter {
        backend: Backend::Redis,
        redis: Some(RedisSettings {
            url: Some(url.into()),
            timeout: Dur(timeout),
            key_prefix: prefix.into(),
            ..RedisSettings::default()
        }),
        ..Limiter::default()
    };
    RedisStore::new(&limiter, 1, None).unwrap()
}

/// A sliding log of `limit` per `period_secs`.
fn log_limit(limit: u64, period_secs: u64) -> Params {
    Params {
        rate: Rate {
            limit,
            period: Duration::from_secs(period_secs),
        },
        burst: None,
        algorithm: Algorithm::SlidingWindowLog,
    }
}

fn cluster(urls: &[String]) -> RedisStore {
    let limiter = Limiter {
        backend: Backend::RedisCluster,
        redis: Some(RedisSettings {
            urls: urls.to_vec(),
            timeout: Dur(Duration::from_secs(2)),
            key_prefix: unique("t"),
            ..RedisSettings::default()
        }),
        ..Limiter::default()
    };
    RedisStore::new(&limiter, 1, None).unwrap()
}

fn check(key: &str, tag: u64, params: Params, cost: u64, shadow: bool) -> Check {
    let mut c = Check::new(key.into(), params, cost, shadow);
    c.tag = tag;
    c
}

fn fixed(limit: u64) -> Params {
    Params {
        rate: Rate {
            limit,
            period: Duration::from_secs(60),
        },
        burst: None,
        algorithm: Algorithm::FixedWindow,
    }
}

async fn run_table(store: &RedisStore) {
    behaviour_table!(|n, case, step| {
        let key = format!("case-{n}");
        let c = check(&key, n as u64, case.params, step.cost, false).with_mode(step.mode);
        let d = store
            .decide(0, vec![c], Some(ALIGNED_START + step.at), true)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        d[0]
    });
}

#[tokio::test]
async fn redis_passes_the_behaviour_table() {
    let redis = testkit::Redis::shared();
    run_table(&single(redis.url(), Duration::from_secs(2))).await;
}

#[tokio::test]
async fn redis_cluster_passes_the_behaviour_table() {
    let cluster_ = testkit::RedisCluster::shared();
    run_table(&cluster(cluster_.urls())).await;
}

async fn all_or_nothing(store: &RedisStore) {
    // Three limits of one call (one hash tag): the narrow one refuses, so
    // neither of the others is charged.
    let tag = 7;
    let wide = check("wide", tag, fixed(10), 1, false);
    let narrow = check("narrow", tag, fixed(1), 1, false);
    let shadow = check("shadow", tag, fixed(1), 1, true);
    let all = [wide.clone(), narrow.clone(), shadow.clone()];
    let d = store.decide(0, all.to_vec(), None, true).await.unwrap();
    assert!(d.iter().all(|d| d.allowed), "{d:?}");
    for _ in 0..5 {
        let d = store.decide(0, all.to_vec(), None, true).await.unwrap();
        assert!(d[0].allowed && !d[1].allowed && !d[2].allowed, "{d:?}");
    }
    let d = store.decide(0, vec![wide], None, true).await.unwrap();
    assert_eq!(d[0].remaining, 8, "only the first call was charged");
    // A shadow limit that refuses does not block the others.
    let other = check("other", tag, fixed(5), 1, false);
    let d = store
        .decide(0, vec![shadow, other], None, true)
        .await
        .unwrap();
    assert!(!d[0].allowed && d[1].allowed, "{d:?}");
}

#[tokio::test]
async fn a_refused_call_consumes_no_other_limit_in_redis() {
    all_or_nothing(&single(
        testkit::Redis::shared().url(),
        Duration::from_secs(2),
    ))
    .await;
}

#[tokio::test]
async fn a_refused_call_consumes_no_other_limit_in_redis_cluster() {
    all_or_nothing(&cluster(testkit::RedisCluster::shared().urls())).await;
}

/// A limit charged after the call, beside a call's other limit: a peek
/// that refuses keeps the other limit's units (refunded from another slot
/// in a cluster: `other_tag`), a peek that passes takes nothing, and a
/// charge never refuses.
async fn peeks_and_charges(store: &RedisStore, other_tag: u64) {
    let tag = 11;
    let run = format!("{}-{}", std::process::id(), other_tag);
    let charged = |mode| check(&format!("charged-{run}"), tag, fixed(2), 1, false).with_mode(mode);
    for _ in 0..3 {
        let d = store
            .decide(0, vec![charged(check::Use::Charge)], None, true)
            .await
            .unwrap();
        assert!(d[0].allowed, "a charge never refuses: {d:?}");
    }
    let wide = check(&format!("wide-{run}"), other_tag, fixed(10), 1, false);
    let d = store
        .decide(0, vec![wide.clone(), charged(check::Use::Peek)], None, true)
        .await
        .unwrap();
    assert!(d[0].allowed && !d[1].allowed, "{d:?}");
    let d = store.decide(0, vec![wide], None, true).await.unwrap();
    assert_eq!(d[0].remaining, 9, "the refused call took nothing");
    let peeked =
        check(&format!("peeked-{run}"), tag, fixed(1), 1, false).with_mode(check::Use::Peek);
    for _ in 0..3 {
        let d = store
            .decide(0, vec![peeked.clone()], None, true)
            .await
            .unwrap();
        assert!(d[0].allowed, "a peek takes nothing: {d:?}");
    }
}

#[tokio::test]
async fn peeks_and_charges_keep_a_call_all_or_nothing_in_redis() {
    peeks_and_charges(
        &single(testkit::Redis::shared().url(), Duration::from_secs(2)),
        11,
    )
    .await;
}

#[tokio::test]
async fn peeks_and_charges_keep_a_call_all_or_nothing_in_redis_cluster() {
    let store = cluster(testkit::RedisCluster::shared().urls());
    // The same slot, then another slot (the take refunded).
    peeks_and_charges(&store, 11).await;
    peeks_and_charges(&store, 12_345).await;
}

#[tokio::test]
async fn cost_larger_than_the_log_window_and_big_costs_work() {
    let store = single(testkit::Redis::shared().url(), Duration::from_secs(2));
    let log = Params {
        rate: Rate {
            limit: 5000,
            period: Duration::from_secs(1),
        },
        burst: None,
        algorithm: Algorithm::SlidingWindowLog,
    };
    let d = store
        .decide(0, vec![check("big", 1, log, 4500, false)], None, true)
        .await
        .unwrap();
    assert!(d[0].allowed);
    assert_eq!(d[0].remaining, 500);
    let d = store
        .decide(0, vec![check("big", 1, log, 501, false)], None, true)
        .await
        .unwrap();
    assert!(!d[0].allowed);
    let d = store
        .decide(0, vec![check("big", 1, log, 6000, false)], None, true)
        .await
        .unwrap();
    assert!(!d[0].allowed, "a cost above the limit never fits");
    assert_eq!(d[0].retry_after_micros, 1_000_000);
}

#[tokio::test]
async fn a_dead_redis_fails_fast_and_the_breaker_recovers() {
    let redis = testkit::Redis::start();
    let store = single(redis.url(), Duration::from_millis(500));
    let c = [check("k", 1, fixed(100), 1, false)];
    store.decide(0, c.to_vec(), None, true).await.unwrap();

    redis.stop();
    let mut breaker_opened = false;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let e = store.decide(0, c.to_vec(), None, true).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(510),
            "waited {:?}",
            started.elapsed()
        );
        if e == StoreError::BreakerOpen {
            breaker_opened = true;
            break;
        }
    }
    assert!(breaker_opened, "the breaker opens after failures in a row");

    redis.start_again();
    let back = testkit::eventually(Duration::from_secs(5), "decisions in Redis again", || {
        let (store, c) = (&store, &c);
        async move { store.decide(0, c.to_vec(), None, true).await.ok() }
    })
    .await;
    assert!(back[0].allowed);
}

/// Calls to a Redis that does not answer end at the timeout, never at the
/// (much longer) connect timeout; `what` says what was waited for.
async fn every_call_ends_by_its_timeout(store: &RedisStore, what: &str) {
    let c = [check("k", 1, fixed(100), 1, false)];
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let e = store.decide(0, c.to_vec(), None, true).await.unwrap_err();
        let waited = started.elapsed();
        assert!(
            matches!(e, StoreError::Timeout | StoreError::BreakerOpen),
            "{what}: {e}"
        );
        assert!(
            waited < Duration::from_millis(250),
            "{what}: a call waited {waited:?} with a 100ms timeout"
        );
    }
}

#[tokio::test]
async fn a_silent_or_frozen_redis_answers_every_call_by_its_timeout() {
    // Accepts connections and never says a word: connecting never ends.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let store = single(&url, Duration::from_millis(100));
    every_call_ends_by_its_timeout(&store, "connecting to a silent listener").await;

    // A real Redis, connected, then frozen (SIGSTOP), then thawed.
    let redis = testkit::Redis::start();
    let store = single(redis.url(), Duration::from_millis(100));
    let c = [check("k", 1, fixed(100), 1, false)];
    store.decide(0, c.to_vec(), None, true).await.unwrap();
    redis.freeze();
    every_call_ends_by_its_timeout(&store, "a frozen Redis").await;
    redis.thaw();
    let back = testkit::eventually(Duration::from_secs(5), "decisions in Redis again", || {
        let (store, c) = (&store, &c);
        async move { store.decide(0, c.to_vec(), None, true).await.ok() }
    })
    .await;
    assert!(back[0].allowed);
}

#[tokio::test]
async fn a_call_that_waited_long_does_not_cut_short_the_calls_batched_with_it() {
    // Redis freezes. Four calls fill the four batches a worker may have in
    // flight; E queues, then F a while later. When the first batch times
    // out, E and F go to Redis together. Redis thaws after E's deadline and
    // before F's: E gets a timeout, F gets Redis's answer.
    let redis = testkit::Redis::start();
    let store = std::sync::Arc::new(single(redis.url(), Duration::from_secs(1)));
    let c = [check("k", 1, fixed(100), 1, false)];
    store.decide(0, c.to_vec(), None, true).await.unwrap();
    redis.freeze();
    let call = |store: std::sync::Arc<RedisStore>| {
        let c = c.to_vec();
        tokio::spawn(async move { store.decide(0, c, None, true).await })
    };
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        in_flight.push(call(store.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = call(store.clone());
    tokio::time::sleep(Duration::from_millis(450)).await;
    let f = call(store.clone());
    // The first batch times out at ~1 s, E's deadline is ~1.05 s, F's ~1.5 s.
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.thaw();
    assert_eq!(e.await.unwrap().unwrap_err(), StoreError::Timeout);
    let f = f.await.unwrap();
    assert!(
        f.as_ref().is_ok_and(|d| d[0].allowed),
        "F still had time when Redis answered: {f:?}"
    );
    for t in in_flight {
        assert_eq!(t.await.unwrap().unwrap_err(), StoreError::Timeout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_script_runs_and_stay_exact() {
    let redis = testkit::Redis::start();
    let store = std::sync::Arc::new(single(redis.url(), Duration::from_secs(2)));
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg(&["RESETSTAT"])
        .exec_async(&mut con)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let c = [check("shared", 1, fixed(50), 1, false)];
                // Without details: allowing limits answer with one number.
                store.decide(0, c.to_vec(), None, false).await.unwrap()[0].allowed
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += u32::from(t.await.unwrap());
    }
    assert_eq!(admitted, 50, "a batch decides its calls one after another");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    let evalsha: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (1..200).contains(&evalsha),
        "{evalsha} script runs for 200 calls: concurrent calls were not batched"
    );
}

#[tokio::test]
async fn one_slow_batch_is_one_failure_for_the_breaker() {
    // Three failures in a row open the breaker; fifty calls that time out
    // in one batch are one failure, not fifty.
    let redis = testkit::Redis::start();
    let store = single(redis.url(), Duration::from_millis(50));
    let c = [check("k", 1, fixed(1000), 1, false)];
    store.decide(0, c.to_vec(), None, true).await.unwrap();
    redis.freeze();
    let calls = (0..50).map(|_| store.decide(0, c.to_vec(), None, true));
    let answers = futures::future::join_all(calls).await;
    assert!(answers
        .iter()
        .all(|a| matches!(a, Err(StoreError::Timeout))));
    redis.thaw();
    let d = store
        .decide(0, c.to_vec(), None, true)
        .await
        .expect("the breaker stayed closed: the next call goes to Redis");
    assert!(d[0].allowed);
}

#[tokio::test]
async fn a_probe_whose_caller_gave_up_never_keeps_the_breaker_open() {
    let redis = testkit::Redis::start();
    let store = single(redis.url(), Duration::from_millis(20));
    let c = [check("k", 1, fixed(1000), 1, false)];
    store.decide(0, c.to_vec(), None, true).await.unwrap();
    redis.freeze();
    // Batches that time out, one after another, open the breaker.
    testkit::eventually(Duration::from_secs(5), "the breaker to open", || {
        let (store, c) = (&store, &c);
        async move {
            matches!(
                store.decide(0, c.to_vec(), None, true).await,
                Err(StoreError::BreakerOpen)
            )
            .then_some(())
        }
    })
    .await;
    // For a second, every caller gives up after 5 ms: each probe the
    // breaker lets out is a call dropped while Redis is silent.
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        let _ = tokio::time::timeout(
            Duration::from_millis(5),
            store.decide(0, c.to_vec(), None, true),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    redis.thaw();
    let back = testkit::eventually(Duration::from_secs(2), "decisions in Redis again", || {
        let (store, c) = (&store, &c);
        async move { store.decide(0, c.to_vec(), None, true).await.ok() }
    })
    .await;
    assert!(back[0].allowed);
}

#[tokio::test]
async fn a_large_cost_in_the_sliding_log_is_one_entry_not_one_per_unit() {
    let redis = testkit::Redis::shared();
    let prefix = unique("zlog");
    let store = prefixed(redis.url(), Duration::from_secs(2), &prefix);
    let log = log_limit(1_000_000, 60);
    let d = store
        .decide(0, vec![check("big", 1, log, 900_000, false)], None, true)
        .await
        .unwrap();
    assert!(d[0].allowed);
    assert_eq!(d[0].remaining, 100_000);
    for _ in 0..50 {
        let d = store
            .decide(0, vec![check("big", 1, log, 1, false)], None, true)
            .await
            .unwrap();
        assert!(d[0].allowed);
    }
    let d = store
        .decide(0, vec![check("big", 1, log, 100_000, false)], None, true)
        .await
        .unwrap();
    assert!(!d[0].allowed, "900,050 used: 100,000 more do not fit");
    assert_eq!(d[0].remaining, 99_950);
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let members: u64 = redis::cmd("ZCARD")
        .arg(format!("{prefix}:{{0000000000000001}}:big"))
        .query_async(&mut con)
        .await
        .unwrap();
    // 51 admissions within one grain (60 s / 1024) of each other or not:
    // at most one entry each, never one per unit.
    assert!(
        (1..=51).contains(&members),
        "{members} entries for 900,050 units"
    );
}

#[tokio::test]
async fn across_cluster_slots_a_refused_call_is_refunded_for_every_algorithm() {
    // The limits of one call on different slots (each key its own tag):
    // each slot decides its part; the part that committed is refunded when
    // another refuses.
    let store = cluster(testkit::RedisCluster::shared().urls());
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowCounter,
        Algorithm::SlidingWindowLog,
        Algorithm::Gcra,
        Algorithm::Calendar(Calendar::Week),
        Algorithm::Calendar(Calendar::Month),
    ] {
        let params = Params {
            rate: Rate {
                limit: 10,
                period: Duration::from_secs(match algorithm {
                    Algorithm::Calendar(Calendar::Week) => 7 * 86_400,
                    Algorithm::Calendar(_) => 30 * 86_400,
                    _ => 3600,
                }),
            },
            burst: None,
            algorithm,
        };
        // Tags 1 and 2 hash to different slots.
        let key = unique(&format!("{algorithm:?}"));
        let wide = check(&format!("wide-{key}"), 1, params, 2, false);
        let narrow = check(&format!("narrow-{key}"), 2, fixed(1), 1, false);
        let both = vec![wide.clone(), narrow.clone()];
        let d = store.decide(0, both.clone(), None, true).await.unwrap();
        assert!(d.iter().all(|d| d.allowed), "{algorithm:?}: {d:?}");
        for _ in 0..3 {
            let d = store.decide(0, both.clone(), None, true).await.unwrap();
            assert!(d[0].allowed && !d[1].allowed, "{algorithm:?}: {d:?}");
        }
        // wide took 2 of 10 for the first call; the refused ones were
        // given back: 4 more calls of 2 fit, the fifth does not.
        for n in 0..4 {
            let d = store
                .decide(0, vec![wide.clone()], None, true)
                .await
                .unwrap();
            assert!(
                d[0].allowed,
                "{algorithm:?}: call {n} after the refunds: {d:?}"
            );
        }
        let d = store
            .decide(0, vec![wide.clone()], None, true)
            .await
            .unwrap();
        assert!(!d[0].allowed, "{algorithm:?}: refunded too much: {d:?}");
    }
}

#[tokio::test]
async fn a_sliding_log_refund_finds_its_entry_behind_many_newer_ones() {
    // A call's units committed at T, then 100 later admissions, then the
    // refund for T (refund.lua, as tollgate sends it): only T's units go.
    let redis = testkit::Redis::shared();
    let prefix = unique("refund");
    let store = prefixed(redis.url(), Duration::from_secs(2), &prefix);
    let log = log_limit(1000, 60);
    let t = ALIGNED_START;
    let at = |ms: u64, cost: u64| {
        let store = &store;
        async move {
            store
                .decide(
                    0,
                    vec![check("log", 1, log, cost, false)],
                    Some(t + ms * 1000),
                    true,
                )
                .await
                .unwrap()[0]
        }
    };
    assert!(at(0, 5).await.allowed);
    // 100 ms apart: more than a grain (60 s / 1024), one entry each.
    for k in 1..=100 {
        assert!(at(100 * k, 1).await.allowed);
    }
    let key = format!("{prefix}:{{0000000000000001}}:log");
    let mut args = vec![0x94, 3, 0xce];
    args.extend_from_slice(&60_000_000u32.to_be_bytes());
    args.extend_from_slice(&[0xce]);
    args.extend_from_slice(&60_000u32.to_be_bytes());
    args.push(5);
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let changed: Vec<i64> = redis::cmd("EVAL")
        .arg(concat!(
            include_str!("../../src/limit/redis/windows.lua"),
            include_str!("../../src/limit/redis/refund.lua")
        ))
        .arg(1)
        .arg(&key)
        .arg(t)
        .arg(args)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(changed, vec![1]);
    // 100 units used: 900 more fit, 901 do not; and still so once T's
    // time has left the window (the refund took T's units, no other's).
    let d = at(10_200, 901).await;
    assert!(!d.allowed && d.remaining == 900, "{d:?}");
    let d = at(60_050, 901).await;
    assert!(!d.allowed && d.remaining == 900, "{d:?}");
    assert!(at(60_050, 900).await.allowed);
}
