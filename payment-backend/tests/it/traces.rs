//! One call's trace across tollgate and the backend, as an OTLP collector
//! receives it: a real TraceService server (from the opentelemetry-proto
//! definitions) gets spans from tollgate (in-process, Redis-backed limit)
//! and from the backend binary, and the Kafka event the call wrote carries
//! the trace on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;

use crate::common::key;

/// A span as the collector got it, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    kind: i32,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| {
                            (
                                a.key.clone(),
                                text(a.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The collector, listening on a free loopback port.
async fn collector() -> (Collector, std::net::SocketAddr) {
    let c = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(c.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (c, addr)
}

/// The spans of `trace` once `want` holds of them (or panics after 60 s).
async fn spans_of(c: &Collector, trace: &str, want: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    crate::common::eventually(Duration::from_secs(60), "the trace's spans", || {
        let spans: Vec<Got> =
            c.0.lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace == trace)
                .cloned()
                .collect();
        let ok = want(&spans);
        async move { ok.then_some(spans) }
    })
    .await
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TOPIC: &str = "payments.events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_is_one_trace_from_tollgate_through_the_backend_to_kafka() {
    let (collector, otlp) = collector().await;
    let kafka = tokio::task::spawn_blocking(|| {
        let k = testkit::Kafka::start();
        k.create_topic(TOPIC, 3);
        k.create_topic("payments.events.dlq", 1);
        k
    })
    .await
    .unwrap();
    let redis = testkit::Redis::shared();
    let db = tempfile::tempdir().unwrap();
    let (grpc, metrics) = (testkit::free_port(), testkit::free_port());
    let _backend = Proc(
        Command::new(env!("CARGO_BIN_EXE_payment-backend"))
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--database-url")
            .arg(format!("sqlite://{}/p.db?mode=rwc", db.path().display()))
            .args(["--kafka-brokers", kafka.brokers()])
            .args(["--relay-poll-interval", "50ms"])
            .arg("--otlp-endpoint")
            .arg(format!("http://{otlp}"))
            // The SDK's batch delay, in milliseconds.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start payment-backend"),
    );
    let yaml = format!(
        r#"listener: {{ address: 127.0.0.1:0, workers: 1 }}
admin: {{ address: 127.0.0.1:0 }}
limiter: {{ backend: redis, redis: {{ url: "{url}", key_prefix: "{prefix}", timeout: 2s }} }}
tracing: {{ endpoint: "http://{otlp}", flush_interval: 200ms }}
upstreams:
  payment-backend: {{ addresses: ["127.0.0.1:{grpc}"] }}
routes:
  - match: {{ service: payments.v1.PaymentService }}
    upstream: payment-backend
    name: payments
    limits:
      - {{ name: everyone, key: [ {{ constant: all }} ], rate: 1000/s, algorithm: gcra }}
  - {{ match: {{}}, upstream: payment-backend, name: rest }}
"#,
        url = redis.url(),
        prefix = key(),
    );
    let (proxy, _dir) = crate::common::start_tollgate_with(&yaml);
    let channel = crate::common::eventually(
        Duration::from_secs(30),
        "the backend to answer through tollgate",
        || async {
            let ch =
                tonic::transport::Channel::from_shared(format!("http://{}", proxy.listen_addr))
                    .unwrap()
                    .connect()
                    .await
                    .ok()?;
            let mut a = AccountServiceClient::new(ch.clone());
            a.create_account(pb::CreateAccountRequest {
                idempotency_key: key(),
                owner: "probe".into(),
                currency: "USD".into(),
            })
            .await
            .ok()?;
            Some(ch)
        },
    )
    .await;
    let accounts = AccountServiceClient::new(channel.clone());
    let mut payments = PaymentServiceClient::new(channel);
    let payer = crate::open_account(&accounts, 1_000).await;
    let payee = crate::open_account(&accounts, 0).await;

    // The client's own trace: tollgate's span is its child.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(pb::CreatePaymentRequest {
        idempotency_key: key(),
        payer_account_id: payer,
        payee_account_id: payee,
        amount: Some(crate::common::usd(250)),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{client_span}-01").parse().unwrap(),
    );
    req.metadata_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    let payment = payments.create_payment(req).await.unwrap().into_inner();

    // Every span of the call, from both processes.
    let spans = spans_of(&collector, trace, |s: &[Got]| {
        s.iter().any(|g| g.name.starts_with("publish"))
    })
    .await;
    let one = |what: &str, f: &dyn Fn(&Got) -> bool| -> Got {
        let found: Vec<&Got> = spans.iter().filter(|g| f(g)).collect();
        assert_eq!(found.len(), 1, "one {what} span: {spans:#?}");
        found[0].clone()
    };
    let method = "payments.v1.PaymentService/CreatePayment";
    let server = one("tollgate server", &|g| {
        g.service == "tollgate" && g.kind == SpanKind::Server as i32
    });
    assert_eq!(server.name, method);
    assert_eq!(server.parent, client_span, "a child of the client's span");
    assert_eq!(server.attributes["rpc.grpc.status_code"], "0");
    assert_eq!(server.attributes["tollgate.route"], "payments");
    let limit = one("limit", &|g| g.name == "limit");
    assert_eq!(limit.parent, server.id);
    assert_eq!(limit.attributes["tollgate.limit"], "allowed");
    let redis_trip = one("redis", &|g| g.name == "redis");
    assert_eq!(
        redis_trip.parent, limit.id,
        "the Redis round trip is the limit's"
    );
    let upstream = one("tollgate upstream", &|g| {
        g.service == "tollgate" && g.kind == SpanKind::Client as i32 && g.name == method
    });
    assert_eq!(upstream.parent, server.id);
    assert_eq!(upstream.attributes["server.port"], grpc.to_string());
    let rpc = one("backend rpc", &|g| {
        g.service == "payment-backend" && g.kind == SpanKind::Server as i32
    });
    assert_eq!(rpc.name, method);
    assert_eq!(
        rpc.parent, upstream.id,
        "the backend's parent is tollgate's upstream call"
    );
    assert_eq!(rpc.attributes["rpc.grpc.status_code"], "0");
    let tx = one("transaction", &|g| g.name == "transaction");
    assert_eq!(tx.parent, rpc.id);
    assert_eq!(tx.attributes["db.system"], "sqlite");
    let publishes: Vec<&Got> = spans
        .iter()
        .filter(|g| g.name.starts_with("publish"))
        .collect();
    for p in &publishes {
        assert_eq!(p.name, format!("publish {TOPIC}"));
        assert_eq!(p.kind, SpanKind::Producer as i32);
        assert_eq!(p.parent, tx.id, "the event was written by the transaction");
    }

    // The event on the topic carries the trace: its traceparent names the
    // publish.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", format!("test-{}", key()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let traceparent = loop {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("the payment's event arrives")
            .unwrap();
        if m.key() != Some(payment.id.as_bytes()) {
            continue;
        }
        let headers = m.headers().expect("headers");
        let tp = headers
            .iter()
            .find(|h| h.key == "traceparent")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("a traceparent header");
        assert!(
            headers
                .iter()
                .all(|h| h.key != "tracestate" || h.value.is_some_and(|v| !v.is_empty())),
            "no empty tracestate header"
        );
        break tp;
    };
    let (t, parent) = (&traceparent[3..35], &traceparent[36..52]);
    assert_eq!(t, trace, "{traceparent}");
    spans_of(&collector, trace, |s: &[Got]| {
        s.iter()
            .any(|g| g.name.starts_with("publish") && g.id == parent)
    })
    .await;

    // A call that came without a trace starts one, and the backend joins it.
    let deposit_traces: Vec<(String, String)> = {
        let c = collector.0.lock().unwrap();
        c.iter()
            .filter(|g| g.service == "tollgate" && g.kind == SpanKind::Server as i32)
            .filter(|g| g.name.ends_with("/Deposit"))
            .map(|g| (g.trace.clone(), g.parent.clone()))
            .collect()
    };
    assert!(!deposit_traces.is_empty());
    for (t, parent) in &deposit_traces {
        assert!(parent.is_empty(), "a new trace has no parent");
        crate::common::eventually(
            Duration::from_secs(30),
            "the backend's span of the deposit",
            || {
                let found = collector
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|g| g.service == "payment-backend" && &g.trace == t);
                async move { found.then_some(()) }
            },
        )
        .await;
    }
    proxy.drain();
}
