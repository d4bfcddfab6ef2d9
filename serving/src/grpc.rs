//! The Open Inference Protocol's gRPC binding (`inference.GRPCInferenceService`, port 8001). Inputs come as
//! raw contents (what `tritonclient.grpc` sends) or typed contents; outputs always go back as raw contents,
//! which every stock client reads. Errors carry the same messages as REST, with INVALID_ARGUMENT,
//! NOT_FOUND, INTERNAL, or UNAVAILABLE for what a retry may fix.

use std::sync::Arc;

use kiln_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use kiln_proto::inference::model_infer_response::InferOutputTensor;
use kiln_proto::inference::model_metadata_response::TensorMetadata;
use kiln_proto::inference::*;
use tonic::{Request, Response, Status};

use crate::tensor::{Tensor, encode_contents, parse_declared};
use crate::{EXTENSIONS, Exchange, SERVER_NAME, ServeError, ServedModel, Serving};

/// The most bytes one gRPC message may carry.
const MESSAGE_BYTES_MAX: usize = 64 << 20;

pub fn service(serving: Arc<Serving>) -> GrpcInferenceServiceServer<InferenceService> {
    GrpcInferenceServiceServer::new(InferenceService { serving })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

pub struct InferenceService {
    serving: Arc<Serving>,
}

fn version_of(version: &str) -> Option<&str> {
    Some(version).filter(|version| !version.is_empty())
}

fn read_inputs(request: &mut ModelInferRequest) -> Result<Vec<Tensor>, ServeError> {
    let raw = std::mem::take(&mut request.raw_input_contents);
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(ServeError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs; expected one per input",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    std::mem::take(&mut request.inputs)
        .into_iter()
        .map(|input| {
            let (datatype, shape) = parse_declared(&input.name, &input.datatype, &input.shape)?;
            let data = match (raw.next(), &input.contents) {
                (Some(_), Some(_)) => {
                    return Err(ServeError::invalid(format!(
                        "input '{}' has contents, but raw_input_contents is given too; expected one or the other",
                        input.name
                    )));
                }
                (Some(bytes), None) => bytes,
                (None, Some(contents)) => encode_contents(&input.name, datatype, contents)?,
                (None, None) => {
                    return Err(ServeError::invalid(format!(
                        "input '{}' has no contents and raw_input_contents is empty",
                        input.name
                    )));
                }
            };
            Tensor::new(input.name, datatype, shape, data)
        })
        .collect()
}

async fn infer(
    served: &ServedModel,
    mut request: ModelInferRequest,
    exchange: &mut Exchange,
) -> Result<ModelInferResponse, ServeError> {
    exchange.id = Some(request.id.clone()).filter(|id| !id.is_empty());
    let inputs = read_inputs(&mut request)?;
    exchange.keep_inputs(&inputs);
    let requested: Vec<String> = request.outputs.iter().map(|output| output.name.clone()).collect();
    let positions = served.check_requested(&requested)?;
    let outputs = ServedModel::select_outputs(served.infer(inputs).await?, &positions);
    exchange.keep_outputs(&outputs);
    let mut response = ModelInferResponse {
        model_name: served.name.clone(),
        model_version: served.version.clone(),
        id: request.id,
        ..ModelInferResponse::default()
    };
    for output in outputs {
        response.outputs.push(InferOutputTensor {
            name: output.name,
            datatype: output.datatype.name().to_string(),
            shape: output.shape.iter().map(|dim| *dim as i64).collect(),
            ..InferOutputTensor::default()
        });
        response.raw_output_contents.push(output.data);
    }
    Ok(response)
}

/// The server's metadata: the same from a replica and from a router.
pub(crate) fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: SERVER_NAME.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: EXTENSIONS.iter().map(ToString::to_string).collect(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.serving.ready(),
        }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self.serving.get(&request.name, version_of(&request.version)).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let served = self
            .serving
            .get(&request.name, version_of(&request.version))
            .map_err(|error| error.grpc_status())?;
        let tensors = |specs: &[crate::TensorSpec]| {
            specs
                .iter()
                .map(|spec| TensorMetadata {
                    name: spec.name.clone(),
                    datatype: spec.datatype.name().to_string(),
                    shape: spec.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: served.name.clone(),
            versions: vec![served.version.clone()],
            platform: served.model.platform().to_string(),
            inputs: tensors(served.model.inputs()),
            outputs: tensors(served.model.outputs()),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let request = request.into_inner();
        let served = self
            .serving
            .get(&request.model_name, version_of(&request.model_version))
            .map_err(|error| error.grpc_status())?;
        let mut exchange = self.serving.begin();
        let outcome = infer(&served, request, &mut exchange).await;
        self.serving.record(&served, "grpc", exchange, outcome.as_ref().err());
        outcome.map(Response::new).map_err(|error| error.grpc_status())
    }
}
