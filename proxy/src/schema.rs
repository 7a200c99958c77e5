//! The schema of an upstream's services: what a field path of names
//! (`amount.currency`) means in field numbers (`4.2`), for the request
//! message of each method. It comes from a descriptor set file
//! (`protoc --descriptor_set_out`) or from the upstream itself by gRPC
//! server reflection, once per load; calls never look at it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};

use crate::config::Config;

/// The most segments a field path may have.
pub(crate) const MAX_PATH: usize = 8;

/// How a field's value is read, from its declared type (or, for a path of
/// numbers, from its wire type alone). Widths matter: a parser keeps the
/// low 32 bits of an int32's varint, so a key must too, or one account
/// number would have 2^32 budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UTF-8 text.
    String,
    /// Bytes (shown in a key as hex).
    Bytes,
    /// int32 and enum: the varint's low 32 bits, two's complement.
    Int32,
    /// int64: two's complement in a varint.
    Int64,
    /// uint32: the varint's low 32 bits.
    Uint32,
    /// uint64.
    Uint64,
    /// sint32: zigzag, low 32 bits.
    Sint32,
    /// sint64: zigzag.
    Sint64,
    /// Any varint but 0 is true.
    Bool,
    /// fixed32.
    Fixed32,
    /// fixed64.
    Fixed64,
    /// sfixed32.
    SFixed32,
    /// sfixed64.
    SFixed64,
    /// float.
    Float,
    /// double.
    Double,
    /// No schema: as the wire type says (a varint or fixed value unsigned,
    /// a length-delimited one as text).
    Wire,
}

impl Kind {
    /// Whether a cost can be read from it: a whole number.
    pub(crate) fn is_integer(self) -> bool {
        !matches!(
            self,
            Kind::String | Kind::Bytes | Kind::Float | Kind::Double
        )
    }

    fn of(t: Type) -> Option<Kind> {
        Some(match t {
            Type::String => Kind::String,
            Type::Bytes => Kind::Bytes,
            Type::Int32 | Type::Enum => Kind::Int32,
            Type::Int64 => Kind::Int64,
            Type::Uint32 => Kind::Uint32,
            Type::Uint64 => Kind::Uint64,
            Type::Sint32 => Kind::Sint32,
            Type::Sint64 => Kind::Sint64,
            Type::Bool => Kind::Bool,
            Type::Fixed32 => Kind::Fixed32,
            Type::Fixed64 => Kind::Fixed64,
            Type::Sfixed32 => Kind::SFixed32,
            Type::Sfixed64 => Kind::SFixed64,
            Type::Float => Kind::Float,
            Type::Double => Kind::Double,
            Type::Message | Type::Group => return None,
        })
    }
}

/// A field path resolved to numbers, and how its value reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldPath {
    /// Field numbers, outermost first.
    pub(crate) numbers: Vec<u32>,
    /// How the last one's value reads.
    pub(crate) kind: Kind,
}

/// A path written as field numbers (`"4.1"`): readable with no schema.
pub(crate) fn numeric(path: &str) -> Option<FieldPath> {
    let numbers: Option<Vec<u32>> = path
        .split('.')
        .map(|s| s.parse().ok().filter(|n| (1..=536_870_911).contains(n)))
        .collect();
    numbers.map(|numbers| FieldPath {
        numbers,
        kind: Kind::Wire,
    })
}

/// Whether `path` is well formed: 1 to [`MAX_PATH`] segments, all field
/// names (letters, digits, `_`, not starting with a digit) or all field
/// numbers (1 to 2^29 - 1). `Err` says what is wrong.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    if segments.len() > MAX_PATH {
        return Err(format!("has more than {MAX_PATH} segments"));
    }
    if numeric(path).is_some() {
        return Ok(());
    }
    let name = |s: &&str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if segments.iter().all(name) {
        return Ok(());
    }
    Err(
        "must be field names joined by '.' (amount.currency) or field numbers (4.2), not a mix"
            .into(),
    )
}

struct Field {
    number: u32,
    ty: Type,
    repeated: bool,
    /// A message field's type, fully qualified with a leading `.`.
    type_name: String,
}

/// A method's request type.
#[derive(Debug, Clone)]
pub(crate) struct MethodType {
    /// Fully qualified, with a leading `.`.
    pub(crate) input: String,
}

/// Messages and methods of a set of files.
#[derive(Default)]
pub(crate) struct Schema {
    /// By full name with a leading `.`: field name → field.
    messages: HashMap<String, HashMap<String, Field>>,
    /// Service (`package.Service`) → method name → its types.
    services: HashMap<String, HashMap<String, MethodType>>,
}

// === impl Schema ===

impl Schema {
    /// From the bytes of a `FileDescriptorSet`.
    pub(crate) fn from_descriptor_set(bytes: &[u8]) -> Result<Schema, String> {
        let set = FileDescriptorSet::decode(bytes)
            .map_err(|_| "is not a protobuf FileDescriptorSet (make one with protoc --include_imports --descriptor_set_out)".to_string())?;
        let mut s = Schema::default();
        for f in &set.file {
            s.add_file(f);
        }
        Ok(s)
    }

    /// Reads a descriptor set file.
    pub(crate) fn read(path: &Path) -> Result<Schema, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Schema::from_descriptor_set(&bytes).map_err(|e| format!("{} {e}", path.display()))
    }

    fn add_file(&mut self, f: &FileDescriptorProto) {
        let package = f.package.as_deref().unwrap_or("");
        let prefix = if package.is_empty() {
            String::new()
        } else {
            format!(".{package}")
        };
        for m in &f.message_type {
            self.add_message(&prefix, m);
        }
        for svc in &f.service {
            let name = format!("{prefix}.{}", svc.name())
                .trim_start_matches('.')
                .to_owned();
            let methods = self.services.entry(name).or_default();
            for m in &svc.method {
                methods.insert(
                    m.name().to_owned(),
                    MethodType {
                        input: m.input_type().to_owned(),
                    },
                );
            }
        }
    }

    fn add_message(&mut self, prefix: &str, m: &DescriptorProto) {
        let name = format!("{prefix}.{}", m.name());
        let fields = m
            .field
            .iter()
            .map(|f| {
                (
                    f.name().to_owned(),
                    Field {
                        number: u32::try_from(f.number()).unwrap_or(0),
                        ty: f.r#type(),
                        repeated: f.label() == Label::Repeated,
                        type_name: f.type_name().to_owned(),
                    },
                )
            })
            .collect();
        for nested in &m.nested_type {
            self.add_message(&name, nested);
        }
        self.messages.insert(name, fields);
    }

    /// The methods a route's match takes: `(service, method, types)`.
    pub(crate) fn methods(
        &self,
        matches: impl Fn(&str, &str) -> bool,
    ) -> Vec<(&str, &str, &MethodType)> {
        let mut out = Vec::new();
        for (s, methods) in &self.services {
            for (m, t) in methods {
                if matches(s, m) {
                    out.push((s.as_str(), m.as_str(), t));
                }
            }
        }
        out
    }

    /// `path` (names) in the message `input`: its numbers and how its
    /// value reads, or what is wrong (which message lacks which field).
    pub(crate) fn resolve(&self, input: &str, path: &str) -> Result<FieldPath, String> {
        let shown = |m: &str| m.trim_start_matches('.').to_owned();
        let mut message = input;
        let mut numbers = Vec::new();
        let mut segments = path.split('.').peekable();
        while let Some(seg) = segments.next() {
            let fields = self
                .messages
                .get(message)
                .ok_or_else(|| format!("the schema lacks the message {}", shown(message)))?;
            let f = fields
                .get(seg)
                .ok_or_else(|| format!("{} has no field {seg:?}", shown(message)))?;
            if f.repeated {
                return Err(format!(
                    "{}.{seg} is repeated (or a map): a limit reads one value",
                    shown(message)
                ));
            }
            numbers.push(f.number);
            if segments.peek().is_none() {
                let kind = Kind::of(f.ty).ok_or_else(|| {
                    format!(
                        "{}.{seg} is a message; name one of its fields ({seg}.<field>)",
                        shown(message)
                    )
                })?;
                return Ok(FieldPath { numbers, kind });
            }
            if f.ty != Type::Message {
                return Err(format!(
                    "{}.{seg} is not a message: nothing is inside it",
                    shown(message)
                ));
            }
            message = &f.type_name;
        }
        Err("is empty".into())
    }
}

/// Each upstream's schema, by upstream name: loaded, or why not (only
/// reflection can fail without failing the load: the upstream may not be
/// up yet).
pub(crate) type Schemas = HashMap<String, Result<Arc<Schema>, String>>;

/// The schemas a tool reads with no network: descriptor set files; an
/// upstream whose schema is asked by reflection has none (its field names
/// stay unresolved, and say why).
/// `given`: upstream name → a descriptor set file to use instead.
pub(crate) fn load_offline(
    config: &Config,
    base: Option<&Path>,
    given: &[(String, std::path::PathBuf)],
) -> Result<Schemas, String> {
    let mut out = Schemas::new();
    for (name, file) in given {
        if !config.upstreams.contains_key(name) {
            return Err(format!(
                "--schema {name}=…: the config has no upstream named {name:?}"
            ));
        }
        let s =
            Schema::read(file).map_err(|e| format!("--schema {name}={}: {e}", file.display()))?;
        out.insert(name.clone(), Ok(Arc::new(s)));
    }
    for (name, u) in &config.upstreams {
        let Some(source) = &u.schema else { continue };
        if out.contains_key(name) {
            continue;
        }
        let entry = match &source.descriptor_set {
            Some(file) => Ok(Arc::new(
                Schema::read(&crate::config::resolve(file, base))
                    .map_err(|e| format!("upstreams.{name}.schema.descriptor_set: {e}"))?,
            )),
            None => Err(format!(
                "upstream {name:?} gives its schema by reflection, which this tool does not ask: give it with --schema {name}=FILE (a FileDescriptorSet), or use field numbers"
            )),
        };
        out.insert(name.clone(), entry);
    }
    Ok(out)
}

/// Loads the schema of every upstream that names one: its descriptor set
/// file, or reflection asked of its addresses in turn. When reflection does
/// not answer, `previous` (the config in force) keeps its last answer.
pub(crate) fn load(
    config: &Config,
    base: Option<&Path>,
    previous: Option<&Schemas>,
) -> Result<Schemas, String> {
    let mut out = Schemas::new();
    for (name, u) in &config.upstreams {
        let Some(source) = &u.schema else { continue };
        if let Some(file) = &source.descriptor_set {
            let s = Schema::read(&crate::config::resolve(file, base))
                .map_err(|e| format!("upstreams.{name}.schema.descriptor_set: {e}"))?;
            out.insert(name.clone(), Ok(Arc::new(s)));
            continue;
        }
        let mut why = String::from("it has no address");
        let mut got = None;
        for a in &u.addresses {
            let Ok(hp) = a.value() else { continue };
            match endpoint(u, hp, base).and_then(|e| fetch(e, source.timeout.0)) {
                Ok(s) => {
                    got = Some(s);
                    break;
                }
                Err(e) => why = format!("{}: {e}", a.text()),
            }
        }
        let entry = match got {
            Some(s) => {
                tracing::info!(upstream = %name, "request schema loaded by reflection");
                Ok(Arc::new(s))
            }
            None => {
                let kept = previous
                    .and_then(|p| p.get(name))
                    .and_then(|s| s.as_ref().ok())
                    .cloned();
                match kept {
                    Some(s) => {
                        tracing::warn!(upstream = %name, error = %why, "reflection did not answer; the schema loaded before stays");
                        Ok(s)
                    }
                    None => {
                        tracing::warn!(upstream = %name, error = %why, "reflection did not answer: limits that read fields by name refuse calls (UNAVAILABLE) until it does; retried every few seconds");
                        Err(why)
                    }
                }
            }
        };
        out.insert(name.clone(), entry);
    }
    Ok(out)
}

/// The reflection endpoint of one of an upstream's addresses, with its TLS.
fn endpoint(
    u: &crate::config::Upstream,
    hp: &crate::config::HostPort,
    base: Option<&Path>,
) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let host = if hp.host.contains(':') {
        format!("[{}]", hp.host)
    } else {
        hp.host.clone()
    };
    let scheme = if u.tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{host}:{}", hp.port))
        .map_err(|_| "not a usable address".to_string())?
        .connect_timeout(u.connect_timeout.0);
    if let Some(t) = &u.tls {
        let ca = std::fs::read(crate::config::resolve(&t.ca, base))
            .map_err(|e| format!("cannot read the CA bundle: {e}"))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(t.server_name.clone().unwrap_or_else(|| hp.host.clone()));
        e = e.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    Ok(e)
}

/// Fetches the schema of every service `address` serves, by gRPC server
/// reflection (`grpc.reflection.v1`): the list of services, the file of
/// each and the files they import. Blocks the calling thread for at most
/// `timeout`; safe to call from inside a runtime.
pub(crate) fn fetch(
    endpoint: tonic::transport::Endpoint,
    timeout: Duration,
) -> Result<Schema, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                rt.block_on(async {
                    match tokio::time::timeout(timeout, reflect(endpoint)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!(
                            "no complete answer within {}",
                            humantime::format_duration(timeout)
                        )),
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the reflection client failed".into()))
    })
}

async fn reflect(endpoint: tonic::transport::Endpoint) -> Result<Schema, String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {}", source_text(&e)))?;
    let mut client = ServerReflectionClient::new(channel);
    let ask = |req: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    // One stream, a request at a time.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("reflection refused: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut next = async |req: MessageRequest| -> Result<MessageResponse, String> {
        tx.send(ask(req))
            .await
            .map_err(|_| "the reflection stream closed".to_string())?;
        match answers.message().await {
            Ok(Some(r)) => r
                .message_response
                .ok_or_else(|| "an empty reflection answer".to_string()),
            Ok(None) => Err("the reflection stream ended early".into()),
            Err(s) => Err(format!(
                "reflection failed: {} ({:?})",
                s.message(),
                s.code()
            )),
        }
    };
    let services = match next(MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(l) => l.service,
        _ => return Err("reflection answered ListServices with something else".into()),
    };
    let mut seen: HashSet<String> = HashSet::new();
    let mut files: Vec<FileDescriptorProto> = Vec::new();
    let mut wanted: Vec<MessageRequest> = services
        .into_iter()
        .take(1_000)
        .map(|s| MessageRequest::FileContainingSymbol(s.name))
        .collect();
    while let Some(req) = wanted.pop() {
        if files.len() >= 10_000 {
            return Err("the upstream's schema has more than 10,000 files".into());
        }
        let found = match next(req).await? {
            MessageResponse::FileDescriptorResponse(f) => f.file_descriptor_proto,
            // A symbol or file the server lists but cannot give: skipped.
            MessageResponse::ErrorResponse(_) => continue,
            _ => return Err("reflection answered with something unexpected".into()),
        };
        for raw in found {
            let f = FileDescriptorProto::decode(raw.as_slice()).map_err(|_| {
                "reflection sent a file descriptor that does not decode".to_string()
            })?;
            if !seen.insert(f.name().to_owned()) {
                continue;
            }
            for dep in &f.dependency {
                if !seen.contains(dep) {
                    wanted.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
            files.push(f);
        }
    }
    let mut s = Schema::default();
    for f in &files {
        s.add_file(f);
    }
    Ok(s)
}

/// An error and its causes, as one line.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // Layers of one library often repeat their cause's words.
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payments() -> Schema {
        Schema::from_descriptor_set(tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn names_resolve_to_numbers_and_kinds() {
        let s = payments();
        let input = ".payments.v1.CreatePaymentRequest";
        assert_eq!(
            s.resolve(input, "payer_account_id"),
            Ok(FieldPath {
                numbers: vec![2],
                kind: Kind::String
            })
        );
        assert_eq!(
            s.resolve(input, "amount.amount_minor"),
            Ok(FieldPath {
                numbers: vec![4, 1],
                kind: Kind::Int64
            })
        );
        assert_eq!(
            s.resolve(input, "capture_method").map(|p| p.kind),
            Ok(Kind::Int32)
        );
        for (path, why) in [
            (
                "payer",
                "payments.v1.CreatePaymentRequest has no field \"payer\"",
            ),
            ("amount.cents", "payments.v1.Money has no field \"cents\""),
            (
                "amount",
                "payments.v1.CreatePaymentRequest.amount is a message; name one of its fields",
            ),
            (
                "metadata",
                "payments.v1.CreatePaymentRequest.metadata is repeated (or a map)",
            ),
            (
                "description.x",
                "payments.v1.CreatePaymentRequest.description is not a message",
            ),
        ] {
            let e = s.resolve(input, path).unwrap_err();
            assert!(e.starts_with(why), "{path}: {e}");
        }
        let create = s
            .methods(|svc, m| svc == "payments.v1.PaymentService" && m == "CreatePayment")
            .into_iter()
            .map(|(_, _, t)| t.input.clone())
            .collect::<Vec<_>>();
        assert_eq!(create, [input]);
    }

    #[test]
    fn paths_are_names_or_numbers() {
        assert!(check_path("amount.currency").is_ok());
        assert!(check_path("4.2").is_ok());
        assert!(check_path("_x.y1").is_ok());
        assert_eq!(numeric("4.2").map(|p| p.numbers), Some(vec![4, 2]));
        for bad in [
            "",
            "a..b",
            "4.x",
            "1a",
            "0",
            "536870912",
            "a-b",
            &"a.".repeat(9),
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(Schema::from_descriptor_set(b"\xff\xff").is_err());
    }
}
