//! Tower middleware that counts every gRPC request by method and status code and times it
//! to its response headers (for unary calls, the whole call; for streams, their start).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

/// Services whose methods are recorded by name; any other path counts as `other`, so that a
/// client cannot create label values at will.
const KNOWN_SERVICES: [&str; 5] = [
    "/byokd.v1.Vault/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/byokd.bench.v1.Baseline/",
];

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

/// The metric label of a request path.
fn method_label(path: &str) -> String {
    let known = KNOWN_SERVICES.iter().any(|s| {
        path.strip_prefix(s).is_some_and(|m| {
            !m.is_empty() && m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric())
        })
    });
    if known {
        path.to_string()
    } else {
        "other".to_string()
    }
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
                    crate::metrics::global().rpc(method, code, started.elapsed());
                    Ok(response)
                }
                Err(e) => {
                    let status = tonic::Status::from_error(e.into());
                    crate::metrics::global().rpc(method, status.code(), started.elapsed());
                    Err(Box::new(status) as Box<dyn std::error::Error + Send + Sync>)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(method_label("/byokd.v1.Vault/Get"), "/byokd.v1.Vault/Get");
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/byokd.v1.Vault/"), "other");
        assert_eq!(method_label("/byokd.v1.Vault/Get/../x"), "other");
        assert_eq!(method_label("/evil.Service/Method"), "other");
        assert_eq!(
            method_label(&format!("/byokd.v1.Vault/{}", "A".repeat(65))),
            "other"
        );
    }

    #[test]
    fn codes_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), tonic::Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(response_code(&h), tonic::Code::NotFound);
    }
}
