//! The `:path` of a gRPC call: `/package.Service/Method`.

/// A parsed gRPC path, borrowing from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrpcPath<'a> {
    /// `package.Service`.
    pub(crate) service: &'a str,
    /// `Method`.
    pub(crate) method: &'a str,
}

/// Parses `/package.Service/Method`; `None` when the path has another shape.
pub(crate) fn parse(path: &str) -> Option<GrpcPath<'_>> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some(GrpcPath { service, method })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse("/payments.v1.PaymentService/CreatePayment"),
            Some(GrpcPath {
                service: "payments.v1.PaymentService",
                method: "CreatePayment"
            })
        );
        for bad in ["", "/", "//", "/svc", "/svc/", "svc/m", "/a/b/c"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
