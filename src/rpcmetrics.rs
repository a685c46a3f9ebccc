//! Tower middleware that counts every gRPC request by method and status code and times it
//! to its response headers (for unary calls, the whole call; for streams, their start).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

/// Methods byokd serves besides those of `byokd.v1` (which come from its descriptor set).
const OTHER_METHODS: [&str; 5] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/byokd.bench.v1.Baseline/Echo",
];

/// Every method byokd serves, by path: the only label values a request can make, so that
/// the metrics stay the same size whatever paths callers send.
static KNOWN_METHODS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
    std::sync::LazyLock::new(|| {
        use prost::Message;
        let mut known: std::collections::HashSet<&'static str> =
            OTHER_METHODS.iter().copied().collect();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::api::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        // Made once per process, for the few dozen methods there are: the
                        // labels are then borrowed, not allocated per request.
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        known.insert(path.leak());
                    }
                }
            }
        }
        known
    });

/// The label of paths byokd does not serve.
const UNKNOWN: &str = "unknown";

/// Adds [`RpcMetrics`] around a service.
#[derive(Debug, Clone, Copy)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// Records each request in [`crate::metrics::global`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// The metric label of a request path: the path of a method byokd serves, else `unknown`.
fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS.get(path).copied().unwrap_or(UNKNOWN)
}

/// The status of a response whose headers are in: trailers-only responses (errors) carry
/// `grpc-status` in the headers; otherwise the call got as far as answering (`OK`).
fn response_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B, RB> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        // The clone is ready only after poll_ready; the polled one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = Instant::now();
        Box::pin(async move {
            match inner.call(request).await {
                Ok(response) => {
                    let code = response_code(response.headers());
                    crate::metrics::global().rpc(method, code_name(code), started.elapsed());
                    Ok(response)
                }
                Err(e) => {
                    let status = tonic::Status::from_error(e.into());
                    crate::metrics::global().rpc(
                        method,
                        code_name(status.code()),
                        started.elapsed(),
                    );
                    Err(Box::new(status) as Box<dyn std::error::Error + Send + Sync>)
                }
            }
        })
    }
}

/// The canonical name of a gRPC code, as in the gRPC spec (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_methods_byokd_serves_become_labels() {
        for method in [
            "/byokd.v1.Vault/Get",
            "/byokd.v1.Vault/WatchAudit",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(method_label(method), method);
        }
        for path in [
            "/byokd.v1.Vault/",
            "/byokd.v1.Vault/Getx",
            "/byokd.v1.Vault/Get/../x",
            "/byokd.v1.Vault/ABC123",
            "/grpc.health.v1.Health/Nope",
            "/evil.Service/Method",
        ] {
            assert_eq!(method_label(path), "unknown", "{path}");
        }
    }

    #[test]
    fn codes_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), tonic::Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(response_code(&h), tonic::Code::NotFound);
    }
}
