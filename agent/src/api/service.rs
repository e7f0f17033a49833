//! The `weft.v1.Agent` gRPC service: requests become domain values, the endpoint logic runs,
//! results and errors become messages and statuses.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use weft_proto::v1 as pb;

use super::convert::{endpoint_to_pb, status_to_pb};
use crate::context::Context;
use crate::endpoints::{self, EndpointError};
use crate::model::{AttachRequest, ContainerId};
use crate::telemetry::metrics::{Histogram, Metrics};
use weft_etcd::StoreError;

pub struct Service(pub Arc<Context>);

fn container_id(text: &str) -> Result<ContainerId, Status> {
    ContainerId::new(text).map_err(|e| EndpointError::from(e).into())
}

/// Counts one attach or detach in the metrics.
fn count<T>(
    metrics: &Metrics,
    started: Instant,
    histogram: impl Fn(&Metrics) -> &Histogram,
    counters: impl Fn(&Metrics) -> (&std::sync::atomic::AtomicU64, &std::sync::atomic::AtomicU64),
    result: &Result<T, EndpointError>,
) {
    histogram(metrics).observe(started.elapsed());
    let (ok, failed) = counters(metrics);
    match result {
        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            if matches!(e, EndpointError::Store(StoreError::Unavailable(_))) {
                metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
            }
            failed.fetch_add(1, Ordering::Relaxed)
        }
    };
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Service {
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let started = Instant::now();
        let result = match AttachRequest::try_from(request.into_inner()) {
            Ok(request) => endpoints::attach(&self.0, request).await,
            Err(invalid) => Err(invalid.into()),
        };
        count(
            &self.0.metrics,
            started,
            |m| &m.attach_seconds,
            |m| (&m.attach_ok, &m.attach_failed),
            &result,
        );
        Ok(Response::new(pb::AttachResponse {
            endpoint: Some(endpoint_to_pb(&result?)),
        }))
    }

    async fn detach(
        &self,
        request: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let started = Instant::now();
        let result = match ContainerId::new(&request.into_inner().container_id) {
            Ok(id) => endpoints::detach(&self.0, &id).await,
            Err(invalid) => Err(invalid.into()),
        };
        count(
            &self.0.metrics,
            started,
            |m| &m.detach_seconds,
            |m| (&m.detach_ok, &m.detach_failed),
            &result,
        );
        result?;
        Ok(Response::new(pb::DetachResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let id = container_id(&request.into_inner().container_id)?;
        let record = self
            .0
            .endpoints
            .get(id.as_str())
            .ok_or_else(|| Status::from(EndpointError::NotAttached(id.to_string())))?;
        Ok(Response::new(endpoint_to_pb(&record)))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let id = container_id(&request.into_inner().container_id)?;
        let (record, problems) = endpoints::check(&self.0, &id).await?;
        Ok(Response::new(pb::CheckResponse {
            endpoint: Some(endpoint_to_pb(&record)),
            problems,
        }))
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(pb::ListResponse {
            endpoints: self.0.endpoints.list().iter().map(endpoint_to_pb).collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status_to_pb(
            crate::status::status(&self.0).await,
        )))
    }

    async fn inventory(
        &self,
        _request: Request<pb::InventoryRequest>,
    ) -> Result<Response<pb::InventoryResponse>, Status> {
        let kernel_error = |e: crate::kernel::KernelError| Status::internal(e.to_string());
        let links = self.0.kernel.links().await.map_err(kernel_error)?;
        let routes = self.0.kernel.routes().await.map_err(kernel_error)?;
        Ok(Response::new(pb::InventoryResponse {
            host: self.0.me().to_string(),
            links: links.into_keys().collect(),
            host_routes: routes
                .iter()
                .filter(|r| r.dst.prefix() == if r.dst.is_ipv4() { 32 } else { 128 })
                .map(|r| r.dst.ip().to_string())
                .collect(),
            namespaces: self
                .0
                .kernel
                .named_namespaces(&format!("weft-{}-", self.0.me())),
        }))
    }
}
