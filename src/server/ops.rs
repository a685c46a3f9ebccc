//! The ops listener: health and Prometheus metrics over plain HTTP, for orchestrators and
//! scrapers, apart from the gRPC port.

use crate::admission::AdmissionLayer;
use crate::connection::Incoming;
use crate::vault::Vault;
use std::sync::Arc;

use super::MAX_LOCAL_ERROR_RESETS;

/// The ops listener: `GET /metrics` (Prometheus text, HTTP/1.1) and `grpc.health.v1`
/// (plaintext HTTP/2) on one port, until shutdown. Carries no secrets and needs no token;
/// its connections are under the same watch as the main port's, and its requests under
/// admission (health `Watch` and scrapes in small pools).
pub(super) async fn serve_ops(
    incoming: Incoming,
    admission: AdmissionLayer,
    max_streams: u32,
    vault: Arc<Vault>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    let metrics = axum::routing::get(move || {
        let vault = vault.clone();
        async move { render_metrics(vault).await }
    });
    let router = tonic::service::Routes::new(health)
        .prepare()
        .into_axum_router()
        .route("/metrics", metrics)
        .fallback(|| async { (http::StatusCode::NOT_FOUND, "not found\n") });
    let app = tower::ServiceBuilder::new()
        .layer(admission)
        .map_response(|response: axum::response::Response| response.map(tonic::body::Body::new))
        .service(router);
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let accepted = tokio::select! {
            accepted = incoming.next() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let Some(Ok(io)) = accepted else {
            continue;
        };
        let info = io.info();
        let app = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(info.clone());
                request
            },
        );
        tokio::spawn(async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(max_streams)
                .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .await
            {
                tracing::debug!(error = %e, "ops connection ended");
            }
        });
    }
}

pub(super) async fn render_metrics(vault: Arc<Vault>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let text = crate::store::on_blocking_thread(async move {
        let snapshot = vault.metrics_snapshot().await.map_err(|e| e.to_string())?;
        crate::metrics::render(&snapshot).map_err(|e| e.to_string())
    })
    .await;
    match text {
        Ok(Ok(text)) => (
            [(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "metrics: cannot read the vault's state");
            (http::StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics task failed");
            (http::StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}
