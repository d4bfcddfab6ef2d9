//! The catalog service: other services' versioned documents (see [`crate::catalog`]), written through the
//! leader like any command and read with ReadIndex on the node that is asked.

use super::*;
use crate::catalog::{AppliedObject, CatalogObject, ObjectDraft, check_request};
use pb::catalog_service_server::CatalogService;

impl Shared {
    pub(super) async fn apply_catalog(
        &self,
        namespace: String,
        objects: Vec<ObjectDraft>,
        replace: bool,
    ) -> Result<WriteOutcome, CoordinatorError> {
        match self
            .propose(Command::ApplyCatalog {
                namespace,
                objects,
                replace,
                now_ms: now_ms(),
            })
            .await?
        {
            CommandResult::CatalogApplied(objects) => Ok(WriteOutcome::CatalogApplied { objects }),
            other => Err(CoordinatorError::Internal(format!(
                "unexpected catalog result {other:?}"
            ))),
        }
    }
}

impl From<&AppliedObject> for pb::AppliedCatalogObject {
    fn from(object: &AppliedObject) -> Self {
        pb::AppliedCatalogObject {
            kind: object.kind.clone(),
            name: object.name.clone(),
            version: object.version,
            change: object.change.label().to_string(),
        }
    }
}

impl From<CatalogObject> for pb::CatalogObject {
    fn from(object: CatalogObject) -> Self {
        pb::CatalogObject {
            namespace: object.namespace,
            kind: object.kind,
            name: object.name,
            versions: object
                .versions
                .into_iter()
                .map(|version| pb::CatalogObjectVersion {
                    version: version.version,
                    content: version.content,
                    applied_at_ms: version.applied_at_ms,
                    deleted: version.deleted,
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl CatalogService for Shared {
    async fn apply(
        &self,
        request: GrpcRequest<pb::ApplyCatalogRequest>,
    ) -> Result<Response<pb::ApplyCatalogResponse>, Status> {
        let request = request.into_inner();
        let objects: Vec<ObjectDraft> = request
            .objects
            .into_iter()
            .map(|object| ObjectDraft {
                kind: object.kind,
                name: object.name,
                content: object.content,
            })
            .collect();
        check_request(&request.namespace, &objects).map_err(|error| error.to_status())?;
        match self
            .execute(Request::ApplyCatalog {
                namespace: request.namespace,
                objects,
                replace: request.replace,
            })
            .await?
        {
            WriteOutcome::CatalogApplied { objects } => Ok(Response::new(pb::ApplyCatalogResponse {
                objects: objects.iter().map(pb::AppliedCatalogObject::from).collect(),
            })),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn list(
        &self,
        request: GrpcRequest<pb::ListCatalogRequest>,
    ) -> Result<Response<pb::ListCatalogResponse>, Status> {
        let request = request.into_inner();
        match self
            .query(Query::ListCatalog {
                namespace: request.namespace,
                include_deleted: request.include_deleted,
                include_history: request.include_history,
            })
            .await?
        {
            QueryResult::Catalog(objects) => Ok(Response::new(pb::ListCatalogResponse {
                objects: objects.into_iter().map(pb::CatalogObject::from).collect(),
            })),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }
}
