//! `tollgate explain`: which route a call matches and why (and which routes
//! it beat), and what each of the route's limits makes of it: the key as
//! the store holds it, the rate, algorithm, cost, failure and over-capacity
//! modes and shadow state. Reads the config only: no store, upstream or
//! network is asked (field names resolve with a `schema.descriptor_set`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Env};
use crate::headers::Facts;
use crate::limit::step::{Keyed, Report};
use crate::limit::{CallInfo, FirstMessage};
use crate::routes::Route;
use crate::schema::{FieldPath, Kind};
use crate::state::Active;

/// What to explain: a call as tollgate would see it.
pub(crate) struct Call {
    /// `/package.Service/Method`.
    pub(crate) path: String,
    /// `name: value` headers (gRPC metadata).
    pub(crate) headers: Vec<String>,
    /// The client's IP (after trusted `x-forwarded-for` hops, as the
    /// listener would read them).
    pub(crate) peer: IpAddr,
    /// The identity of its client certificate.
    pub(crate) tls_identity: Option<String>,
    /// `path=value` fields of its first request message.
    pub(crate) fields: Vec<String>,
}

/// Parses `--schema UPSTREAM=FILE` arguments.
pub(crate) fn schema_args(args: &[String]) -> Result<Vec<(String, std::path::PathBuf)>, String> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(u, f)| (u.to_owned(), std::path::PathBuf::from(f)))
                .ok_or_else(|| format!("--schema {}: write UPSTREAM=FILE", crate::config::shown(a)))
        })
        .collect()
}

/// A call made ready for a route's limits: its route, and the headers,
/// client address and first message the limits read.
pub(crate) struct Prepared {
    /// The route it takes.
    pub(crate) route: Arc<Route>,
    /// Its headers, after the listener's and the route's header policies.
    pub(crate) headers: HeaderMap,
    /// The client's address (after trusted `x-forwarded-for` hops).
    pub(crate) peer: SocketAddr,
    /// Its first request message, encoded from the fields given.
    pub(crate) message: Vec<u8>,
}

impl Prepared {
    /// What the limits see of the call.
    pub(crate) fn info<'a>(
        &'a self,
        call: &'a Call,
        service: &'a str,
        method: &'a str,
    ) -> CallInfo<'a> {
        let reads = self.route.limits.as_ref().is_some_and(|l| l.reads_fields());
        CallInfo {
            service,
            method,
            headers: &self.headers,
            peer: self.peer,
            tls_identity: call.tls_identity.as_deref(),
            worker: 0,
            message: if reads {
                FirstMessage::Held(&self.message)
            } else {
                FirstMessage::NotHeld
            },
            record: None,
        }
    }
}

/// The service and method of a call's path.
pub(crate) fn method_of(path: &str) -> Result<(&str, &str), String> {
    crate::grpc::path::parse(path)
        .map(|p| (p.service, p.method))
        .ok_or_else(|| {
            format!(
                "{} is not a gRPC method path: write /package.Service/Method",
                crate::config::shown(path)
            )
        })
}

/// Readies `call` for the route it takes in `active`; `None`: no route.
pub(crate) fn prepare(active: &Active, call: &Call) -> Result<Option<Prepared>, String> {
    let (service, method) = method_of(&call.path)?;
    let mut headers = HeaderMap::new();
    for h in &call.headers {
        let (name, value) = h.split_once(':').ok_or_else(|| {
            format!(
                "header {}: write a header as 'name: value'",
                crate::config::shown(h)
            )
        })?;
        let name = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("header {}: not a header name", crate::config::shown(name)))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("header {}: not a header value", crate::config::shown(h)))?;
        headers.append(name, value);
    }
    let Some(route) = active.routes.find(service, method) else {
        return Ok(None);
    };
    let route = route.clone();
    let peer = SocketAddr::new(call.peer, 0);
    let peer = match &active.client_ip {
        Some(c) => SocketAddr::new(c.of(peer.ip(), &headers), 0),
        None => peer,
    };
    for policy in [&active.request_headers, &route.request_headers]
        .into_iter()
        .flatten()
    {
        policy.apply(
            &mut headers,
            &Facts {
                tls_identity: call.tls_identity.as_deref(),
                peer_ip: peer.ip(),
            },
        );
    }
    let message = if call.fields.is_empty() {
        Vec::new()
    } else {
        let schema = active
            .schemas
            .get(&*route.upstream.name)
            .and_then(|s| s.as_ref().ok());
        encode_fields(&call.fields, schema.map(|s| &**s), service, method)?
    };
    Ok(Some(Prepared {
        route,
        headers,
        peer,
        message,
    }))
}

/// A config loaded for a tool: every file it names read, no store,
/// upstream or network asked; limits counted in process whatever the
/// backend (`memory` given: the store to count in).
pub(crate) fn load(
    config_path: &Path,
    env: &dyn Env,
    memory: Option<Arc<crate::limit::memory::MemoryStore>>,
    schemas: &[(String, std::path::PathBuf)],
) -> Result<Active, String> {
    let config = Config::load(config_path, env).map_err(|e| e.to_string())?;
    let base = config_path.parent();
    let schemas = crate::schema::load_offline(&config, base, schemas)?;
    let mut stores = super::offline_stores();
    if let Some(m) = memory {
        stores.memory = m;
    }
    Active::build(config, base, stores, schemas, None)
}

/// The explanation, as text; `Err`: the config or the call is unusable.
pub(crate) fn explain(
    config_path: &Path,
    env: &dyn Env,
    schemas: &[(String, std::path::PathBuf)],
    call: &Call,
) -> Result<String, String> {
    let active = load(config_path, env, None, schemas)?;
    let (service, method) = method_of(&call.path)?;
    let mut out = String::new();
    let _ = writeln!(out, "call: /{service}/{method}");
    let Some(prepared) = prepare(&active, call)? else {
        let _ = writeln!(
            out,
            "route: none matches: the call is refused with UNIMPLEMENTED (add a route, or `- match: {{}}`)"
        );
        return Ok(out);
    };
    let route = &prepared.route;
    let matching = crate::routes::matching(&active.config, service, method);
    for (i, (index, how)) in matching.iter().enumerate() {
        let name = active.config.routes[*index].display_name();
        if i == 0 {
            let _ = writeln!(out, "route: {name:?} (routes[{index}]): {how}");
        } else {
            let _ = writeln!(out, "  beat: {name:?} (routes[{index}]): {how}");
        }
    }
    let _ = writeln!(out, "upstream: {}", route.upstream.name);
    if let Some(t) = route.timeout {
        let _ = writeln!(out, "timeout: {}", humantime::format_duration(t));
    }
    let Some(limits) = &route.limits else {
        let _ = writeln!(out, "limits: none: the call goes to the upstream unchecked");
        return Ok(out);
    };
    let reports = limits.explain(&prepared.info(call, service, method));
    let prefix = active
        .config
        .limiter
        .redis
        .as_ref()
        .map_or("tollgate", |r| r.key_prefix.as_str());
    let backend = match active.config.limiter.backend {
        crate::config::Backend::Memory => "in this process (backend memory)".to_owned(),
        crate::config::Backend::Redis => format!("in Redis as {prefix}:{{tag}}:<key>"),
        crate::config::Backend::RedisCluster => {
            format!("in Redis Cluster as {prefix}:{{tag}}:<key>, tag the key's hash")
        }
    };
    let _ = writeln!(out, "limits ({}), counted {backend}:", reports.len());
    for r in &reports {
        write_report(&mut out, r);
    }
    Ok(out)
}

fn write_report(out: &mut String, r: &Report) {
    let _ = writeln!(
        out,
        "  {}{}",
        r.name,
        if r.shadow {
            " (shadow: never refuses)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "    counts:        {}", r.counts);
    match &r.key {
        Keyed::Key {
            stored,
            value,
            overridden,
        } => {
            let _ = writeln!(out, "    key value:     {value:?}");
            let _ = writeln!(out, "    stored as:     {stored:?}");
            let _ = writeln!(
                out,
                "    rate:          {}{}",
                r.rate,
                if *overridden {
                    " (an override for this key)"
                } else {
                    ""
                }
            );
        }
        Keyed::Skipped => {
            let _ = writeln!(
                out,
                "    key:           a part is missing and on_missing is skip: this call is not counted"
            );
            let _ = writeln!(out, "    rate:          {}", r.rate);
        }
        Keyed::Refused(why) => {
            let _ = writeln!(
                out,
                "    key:           the call is refused before any store is asked: {why}"
            );
            let _ = writeln!(out, "    rate:          {}", r.rate);
        }
    }
    let _ = writeln!(out, "    algorithm:     {}", r.algorithm);
    let _ = writeln!(out, "    cost:          {}", r.cost);
    let _ = writeln!(
        out,
        "    Redis down:    {}; no room for the key: {}",
        r.failure_mode, r.over_capacity
    );
}

/// One step of a message being built: a value, or a message of fields.
enum Node {
    Value(Vec<u8>),
    Message(BTreeMap<u32, Node>),
}

/// The first request message holding `fields` (`path=value`), encoded:
/// names resolved with `schema` for the method's input, numbers as they
/// are.
fn encode_fields(
    fields: &[String],
    schema: Option<&crate::schema::Schema>,
    service: &str,
    method: &str,
) -> Result<Vec<u8>, String> {
    let mut root = BTreeMap::new();
    for f in fields {
        let (path, value) = f.split_once('=').ok_or_else(|| {
            format!(
                "--field {}: write a field as path=value",
                crate::config::shown(f)
            )
        })?;
        let at = match crate::schema::numeric(path) {
            Some(p) => p,
            None => {
                let schema = schema.ok_or_else(|| {
                    format!("--field {path}: names need the upstream's schema: give it with --schema UPSTREAM=FILE or a schema.descriptor_set in the config (reflection is not asked), or write the field's numbers (4.1)")
                })?;
                let input = schema
                    .methods(|s, m| s == service && m == method)
                    .first()
                    .map(|(_, _, t)| t.input.clone())
                    .ok_or_else(|| {
                        format!("--field {path}: the schema has no method {service}/{method}")
                    })?;
                schema
                    .resolve(&input, path)
                    .map_err(|e| format!("--field {path}: {e}"))?
            }
        };
        insert(&mut root, &at, value).map_err(|e| format!("--field {path}: {e}"))?;
    }
    let mut out = Vec::new();
    write_message(&mut out, &root);
    Ok(out)
}

fn insert(mut node: &mut BTreeMap<u32, Node>, at: &FieldPath, value: &str) -> Result<(), String> {
    let (last, outer) = at.numbers.split_last().ok_or("is empty")?;
    for n in outer {
        let next = node
            .entry(*n)
            .or_insert_with(|| Node::Message(BTreeMap::new()));
        node = match next {
            Node::Message(m) => m,
            Node::Value(_) => return Err("is inside a field given a value".into()),
        };
    }
    node.insert(*last, Node::Value(encode_value(*last, at.kind, value)?));
    Ok(())
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode_value(number: u32, kind: Kind, value: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let bad = |what: &str| format!("{} is not {what}", crate::config::shown(value));
    let tag = |out: &mut Vec<u8>, wire: u64| varint(out, (u64::from(number) << 3) | wire);
    // No schema: a whole number is a varint (a negative one as int64
    // writes it), anything else text.
    let kind = match kind {
        Kind::Wire if value.parse::<u64>().is_ok() => Kind::Uint64,
        Kind::Wire if value.parse::<i64>().is_ok() => Kind::Int64,
        k => k,
    };
    // A 32-bit field's value must fit it, as a client's would.
    let fits = match kind {
        Kind::Int32 | Kind::Sint32 => value.parse::<i32>().is_ok(),
        Kind::Uint32 => value.parse::<u32>().is_ok(),
        _ => true,
    };
    if !fits {
        return Err(bad("a 32-bit whole number"));
    }
    match kind {
        Kind::String | Kind::Bytes | Kind::Wire => {
            let bytes = if kind == Kind::Bytes {
                hex(value).ok_or_else(|| bad("hex (a bytes field's value is written in hex)"))?
            } else {
                value.as_bytes().to_vec()
            };
            tag(&mut out, 2);
            varint(&mut out, bytes.len() as u64);
            out.extend_from_slice(&bytes);
        }
        Kind::Int32 | Kind::Int64 => {
            let v: i64 = value.parse().map_err(|_| bad("a whole number"))?;
            tag(&mut out, 0);
            varint(&mut out, v as u64);
        }
        Kind::Uint32 | Kind::Uint64 => {
            let v: u64 = value
                .parse()
                .map_err(|_| bad("a whole number of 0 or more"))?;
            tag(&mut out, 0);
            varint(&mut out, v);
        }
        Kind::Sint32 | Kind::Sint64 => {
            let v: i64 = value.parse().map_err(|_| bad("a whole number"))?;
            tag(&mut out, 0);
            varint(&mut out, ((v << 1) ^ (v >> 63)) as u64);
        }
        Kind::Bool => {
            let v = match value {
                "true" => 1,
                "false" => 0,
                _ => return Err(bad("true or false")),
            };
            tag(&mut out, 0);
            varint(&mut out, v);
        }
        Kind::Fixed32 | Kind::SFixed32 | Kind::Float => {
            let bits = match kind {
                Kind::Fixed32 => value.parse::<u32>().map_err(|_| bad("a uint32"))?,
                Kind::SFixed32 => value.parse::<i32>().map_err(|_| bad("an int32"))? as u32,
                _ => value.parse::<f32>().map_err(|_| bad("a number"))?.to_bits(),
            };
            tag(&mut out, 5);
            out.extend_from_slice(&bits.to_le_bytes());
        }
        Kind::Fixed64 | Kind::SFixed64 | Kind::Double => {
            let bits = match kind {
                Kind::Fixed64 => value.parse::<u64>().map_err(|_| bad("a uint64"))?,
                Kind::SFixed64 => value.parse::<i64>().map_err(|_| bad("an int64"))? as u64,
                _ => value.parse::<f64>().map_err(|_| bad("a number"))?.to_bits(),
            };
            tag(&mut out, 1);
            out.extend_from_slice(&bits.to_le_bytes());
        }
    }
    Ok(out)
}

fn hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn write_message(out: &mut Vec<u8>, fields: &BTreeMap<u32, Node>) {
    for (n, node) in fields {
        match node {
            Node::Value(bytes) => out.extend_from_slice(bytes),
            Node::Message(m) => {
                let mut inner = Vec::new();
                write_message(&mut inner, m);
                varint(out, (u64::from(*n) << 3) | 2);
                varint(out, inner.len() as u64);
                out.extend_from_slice(&inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explained(config: &str, call: &Call) -> String {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, config).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("payments.pb");
        std::fs::write(&file, tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET)
            .unwrap_or_else(|e| panic!("{e}"));
        let env: std::collections::HashMap<&str, &str> = Default::default();
        explain(&path, &env, &[("payment-backend".into(), file)], call)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn explain_names_the_route_the_routes_it_beat_and_each_limits_key() {
        let config = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/dev.yaml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let call = Call {
            path: "/payments.v1.PaymentService/CreatePayment".into(),
            headers: vec!["x-merchant-id: merchant-vip".into()],
            peer: "10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}")),
            tls_identity: None,
            fields: vec![
                "payer_account_id=acct_1".into(),
                "amount.currency=USD".into(),
                "amount.amount_minor=2500".into(),
            ],
        };
        let out = explained(&config, &call);
        for line in [
            "route: \"payments.v1.PaymentService/CreatePayment\" (routes[0]): exact service \"payments.v1.PaymentService\", exact method \"CreatePayment\"",
            "  beat: \"payments.v1.PaymentService/*\" (routes[2]): exact service \"payments.v1.PaymentService\", any method",
            "  beat: \"*\" (routes[3]): any service, any method",
            "upstream: payment-backend",
            "limits (2), counted in this process (backend memory):",
            "  create-per-merchant",
            "    key value:     \"merchant-vip\"",
            "    stored as:     \"payments.v1.PaymentService/CreatePayment\\u{1f}create-per-merchant\\u{1f}Gcra\\u{1f}merchant-vip\"",
            "    rate:          1000/s (an override for this key)",
            "    algorithm:     gcra, burst 20",
            "  payer-daily-amount",
            "    key value:     \"acct_1/USD\"",
            "    cost:          2500",
            "    algorithm:     sliding_window_log",
        ] {
            assert!(out.lines().any(|l| l == line), "{line:?} not in\n{out}");
        }
        // Without the payer: the money limit refuses before any store.
        let out = explained(
            &config,
            &Call {
                fields: vec!["amount.currency=USD".into()],
                ..call
            },
        );
        assert!(
            out.contains("key:           the call is refused before any store is asked: INVALID_ARGUMENT: request field \"payer_account_id\" is missing"),
            "{out}"
        );
    }
}
