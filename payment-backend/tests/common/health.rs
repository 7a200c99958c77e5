//! grpc.health.v1 as a client sees it.

use tonic::transport::Channel;

use super::backend::Backend;

/// What grpc.health.v1 says of `service` over `channel` (`None`: no answer).
pub(crate) async fn health_of(
    channel: &Channel,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    tonic_health::pb::health_check_response::ServingStatus::try_from(r.into_inner().status).ok()
}

/// What grpc.health.v1 says of `service` on `b`.
pub(crate) async fn health(
    b: &Backend,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    health_of(&b.channel, service).await
}
