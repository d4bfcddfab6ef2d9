//! What a model version registered through the MLflow API says about itself: when its source is in the
//! cluster's artifact store and holds an MLflow model (an `MLmodel` file, as `mlflow.<flavor>.log_model`
//! writes it), the version gets the tags a Kiln train job gives its versions, read from that file:
//!
//! - `kiln.signature`: `{"inputs": […], "outputs": […]}`, MLflow's column or tensor specs as MLflow wrote
//!   them (`"MLmodel"` when that is longer than a tag may be);
//! - `kiln.runtime`: `{"format": "mlflow", "framework", "flavors", "mlflow_version"}`.
//!
//! A tag the request sets itself is kept. An `MLmodel` that is not YAML, or whose signature is not JSON, is
//! refused with the reason, and no version is made.

use futures::StreamExt;

use super::*;

/// The most characters a version tag's value may have (MLflow's limit).
const TAG_CHARS_MAX: usize = 5_000;

/// The most bytes of an `MLmodel` file that are read.
const MLMODEL_BYTES_MAX: u64 = 1 << 20;

/// The directory in the artifact store that `source` names, if it is in the store:
/// `mlflow-artifacts:/PATH` (or `mlflow-artifacts://HOST/PATH`), `runs:/RUN/PATH` (the run's artifacts), or
/// `models:/m-ID` (an MLflow 3 logged model's files).
pub(super) fn store_directory(tracking: &Tracking, source: &str) -> Option<String> {
    if let Some(rest) = source.strip_prefix("mlflow-artifacts:") {
        let path = match rest.strip_prefix("//") {
            Some(with_host) => with_host.split_once('/').map_or("", |(_, path)| path),
            None => rest,
        };
        let path = path.trim_matches('/');
        return (!path.is_empty()).then(|| path.to_string());
    }
    if let Some(rest) = source.strip_prefix("runs:/") {
        let (run_id, path) = rest.trim_start_matches('/').split_once('/').unwrap_or((rest, ""));
        let run = tracking.run(run_id).ok()?;
        let root = store_directory(tracking, &run.artifact_uri)?;
        let path = path.trim_matches('/');
        return Some(if path.is_empty() {
            root
        } else {
            format!("{root}/{path}")
        });
    }
    if let Some(id) = crate::tracking::logged_model_of(source) {
        let model = tracking.logged_model(id).ok()?;
        return store_directory(tracking, &model.artifact_uri);
    }
    None
}

/// The tags `MLmodel`'s text gives a version, or why the file cannot be read.
pub(super) fn tags_of(text: &str) -> Result<Vec<(String, String)>, String> {
    let model: Value =
        serde_saphyr::from_str(text).map_err(|error| format!("its MLmodel file is not valid YAML: {error}"))?;
    let Some(fields) = model.as_object() else {
        return Err(format!(
            "its MLmodel file is {model}; expected a mapping with 'flavors'"
        ));
    };
    let mut tags = Vec::new();
    if let Some(signature) = fields.get("signature").and_then(Value::as_object) {
        let mut parsed = serde_json::Map::new();
        for part in ["inputs", "outputs", "params"] {
            match signature.get(part) {
                None | Some(Value::Null) => {}
                Some(Value::String(text)) => {
                    let specs: Value = serde_json::from_str(text.as_str()).map_err(|error| {
                        format!("the signature's {part} in its MLmodel file are not JSON ({error}): {text}")
                    })?;
                    parsed.insert(part.to_string(), specs);
                }
                Some(other) => {
                    return Err(format!(
                        "the signature's {part} in its MLmodel file are {other}; expected a JSON list in a string"
                    ));
                }
            }
        }
        if !parsed.is_empty() {
            let text = Value::Object(parsed).to_string();
            let value = if text.chars().count() <= TAG_CHARS_MAX {
                text
            } else {
                "MLmodel".to_string()
            };
            tags.push(("kiln.signature".to_string(), value));
        }
    }
    let flavors: Vec<&String> = fields
        .get("flavors")
        .and_then(Value::as_object)
        .map(|flavors| flavors.keys().collect())
        .unwrap_or_default();
    // The framework is the flavor that is not MLflow's generic python_function, when there is one.
    let framework = flavors
        .iter()
        .find(|flavor| flavor.as_str() != "python_function")
        .or(flavors.first());
    let mut runtime = json!({ "format": "mlflow", "flavors": flavors });
    if let Some(framework) = framework {
        runtime["framework"] = json!(framework);
    }
    if let Some(version) = fields.get("mlflow_version").and_then(Value::as_str) {
        runtime["mlflow_version"] = json!(version);
    }
    tags.push(("kiln.runtime".to_string(), runtime.to_string()));
    Ok(tags)
}

/// The tags the MLflow model at `source` gives a new version of `name` (none when the source is outside
/// the store or holds no `MLmodel`), for the ones `tags` does not set already.
pub(super) async fn source_tags(
    tracker: &Tracker,
    name: &str,
    source: &str,
    tags: &[(String, String)],
) -> Result<Vec<(String, String)>, Failure> {
    let tracking = tracker.read().await?;
    let Some(directory) = store_directory(&tracking, source) else {
        return Ok(Vec::new());
    };
    let path = format!("{directory}/MLmodel");
    let object = crate::tracking::ArtifactRecord::object_of(tracking.artifact(&path), &path);
    let (size, mut stream) = match tracker.artifacts.get_object(&path, object).await {
        Ok(found) => found,
        Err(crate::artifacts::ArtifactError::NotFound(_) | crate::artifacts::ArtifactError::InvalidPath(_)) => {
            return Ok(Vec::new());
        }
        Err(error) => return Err(Failure::from(error)),
    };
    let refuse = |why: String| invalid(format!("model '{name}' cannot get a version from '{source}': {why}"));
    if size > MLMODEL_BYTES_MAX {
        return Err(refuse(format!(
            "its MLmodel file has {size} bytes; expected at most {MLMODEL_BYTES_MAX}"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.map_err(Failure::from)?);
    }
    let text = String::from_utf8(bytes).map_err(|_| refuse("its MLmodel file is not UTF-8 text".into()))?;
    Ok(tags_of(&text)
        .map_err(refuse)?
        .into_iter()
        .filter(|(key, _)| !tags.iter().any(|(given, _)| given == key))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `MLmodel` as `mlflow.onnx.log_model` writes it (MLflow 3.17), with a signature.
    const ONNX_MLMODEL: &str = r#"artifact_path: mlflow-artifacts:/1/models/m-c440283c67a8429d84feeed658efffdd/artifacts
flavors:
  onnx:
    code: null
    data: model.onnx
    onnx_version: 1.23.2
    providers:
    - CUDAExecutionProvider
    - CPUExecutionProvider
  python_function:
    data: model.onnx
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.onnx
    python_version: 3.11.7
mlflow_version: 3.17.2
model_id: m-c440283c67a8429d84feeed658efffdd
signature:
  inputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1,
    64]}}]'
  outputs: '[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}, "name": "label"}]'
  params: null
utc_time_created: '2026-11-28 12:17:08.118831'
"#;

    #[test]
    fn an_mlmodel_gives_the_signature_and_the_runtime() {
        let tags: std::collections::BTreeMap<String, String> = tags_of(ONNX_MLMODEL).unwrap().into_iter().collect();
        let signature: Value = serde_json::from_str(&tags["kiln.signature"]).unwrap();
        assert_eq!(
            signature["inputs"][0]["tensor-spec"],
            json!({ "dtype": "float32", "shape": [-1, 64] }),
            "{signature}"
        );
        assert_eq!(signature["outputs"][0]["name"], "label", "{signature}");
        assert!(signature.get("params").is_none(), "{signature}");
        let runtime: Value = serde_json::from_str(&tags["kiln.runtime"]).unwrap();
        assert_eq!(
            runtime,
            json!({ "format": "mlflow", "framework": "onnx", "flavors": ["onnx", "python_function"], "mlflow_version": "3.17.2" })
        );

        // Without a signature there is only the runtime; a python_function-only model is its own framework.
        let plain = "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n";
        let tags = tags_of(plain).unwrap();
        assert_eq!(tags.len(), 1, "{tags:?}");
        assert!(tags[0].1.contains(r#""framework":"python_function""#), "{tags:?}");
    }

    #[test]
    fn a_broken_mlmodel_is_refused_with_the_reason() {
        let error = tags_of("flavors: [onnx\nsignature: x\n").unwrap_err();
        assert!(error.starts_with("its MLmodel file is not valid YAML: "), "{error}");
        assert!(error.contains("line 2"), "{error}");
        let error = tags_of("signature:\n  inputs: '[{\"type\": '\n").unwrap_err();
        assert!(
            error.starts_with("the signature's inputs in its MLmodel file are not JSON"),
            "{error}"
        );
        let error = tags_of("- a list\n").unwrap_err();
        assert!(error.contains("expected a mapping with 'flavors'"), "{error}");
    }
}
