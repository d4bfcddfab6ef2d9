//! Definitions as the coordinator keeps them: one catalog object per entity, source, feature view and
//! feature service, in the catalog namespace [`NAMESPACE`], its content the object as JSON. The
//! coordinator versions each object (a changed view is a new version); this module turns a checked
//! [`Definitions`] into those objects and the catalog's current objects back into a [`Definitions`].
//!
//! ```text
//!   driver.toml ─parse, check against data─► Definitions ─to_entries─► catalog "features" (replicated)
//!                                                 ▲                        │
//!                                                 └──────from_entries──────┘  + each object's version
//! ```
//!
//! Source paths are made absolute before they are applied (relative to the definitions file), so every
//! reader of the catalog finds the same files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FeatureStoreError;
use crate::definitions::{Definitions, SourceKind};

/// The catalog namespace of feature-store definitions.
pub const NAMESPACE: &str = "features";

pub const ENTITY: &str = "entity";
pub const SOURCE: &str = "source";
pub const FEATURE_VIEW: &str = "feature_view";
pub const FEATURE_SERVICE: &str = "feature_service";

/// One catalog object: what is sent to the coordinator, or what it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    pub kind: String,
    pub name: String,
    pub content: String,
}

/// When and as which version an object was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub version: u32,
    pub applied_at_ms: i64,
}

/// The definitions the catalog holds, with each object's current version, keyed by (kind, name).
#[derive(Debug, Clone, Default)]
pub struct Registered {
    pub definitions: Definitions,
    pub versions: BTreeMap<(String, String), Applied>,
}

impl Registered {
    pub fn version_of(&self, kind: &str, name: &str) -> Option<Applied> {
        self.versions.get(&(kind.to_string(), name.to_string())).copied()
    }
}

impl Definitions {
    /// Makes every file source's path absolute (canonical where the file exists), relative to `base` (the
    /// definitions file's directory).
    pub fn resolve_paths(&mut self, base: &Path) -> Result<(), FeatureStoreError> {
        let base = std::path::absolute(base).map_err(|error| {
            FeatureStoreError::InvalidInput(format!("directory {} cannot be resolved: {error}", base.display()))
        })?;
        for source in &mut self.sources {
            if let SourceKind::File { path } = &mut source.kind {
                if crate::definitions::is_object_url(path) {
                    continue;
                }
                let joined = base.join(&*path);
                // Canonical where the file exists, so two spellings of one file are one definition.
                let resolved = joined.canonicalize().unwrap_or(joined);
                *path = resolved.display().to_string();
            }
        }
        Ok(())
    }
}

fn entry<T: Serialize>(kind: &str, name: &str, value: &T) -> RegistryEntry {
    RegistryEntry {
        kind: kind.to_string(),
        name: name.to_string(),
        content: serde_json::to_string(value).expect("definitions serialize"),
    }
}

/// The catalog objects of `definitions`, one per entity, source, view and service.
pub fn to_entries(definitions: &Definitions) -> Vec<RegistryEntry> {
    let mut entries = Vec::new();
    entries.extend(definitions.entities.iter().map(|e| entry(ENTITY, &e.name, e)));
    entries.extend(definitions.sources.iter().map(|s| entry(SOURCE, &s.name, s)));
    entries.extend(definitions.views.iter().map(|v| entry(FEATURE_VIEW, &v.name, v)));
    entries.extend(definitions.services.iter().map(|s| entry(FEATURE_SERVICE, &s.name, s)));
    entries
}

fn decode<T: DeserializeOwned>(kind: &str, name: &str, content: &str) -> Result<T, FeatureStoreError> {
    serde_json::from_str(content).map_err(|error| {
        FeatureStoreError::InvalidInput(format!(
            "the catalog's {kind} '{name}' cannot be read by this build: {error}"
        ))
    })
}

/// Rebuilds definitions from the catalog's current objects: (entry, version).
pub fn from_entries(
    entries: impl IntoIterator<Item = (RegistryEntry, Applied)>,
) -> Result<Registered, FeatureStoreError> {
    let mut registered = Registered::default();
    for (entry, applied) in entries {
        let (kind, name, content) = (entry.kind.as_str(), entry.name.as_str(), entry.content.as_str());
        match kind {
            ENTITY => registered.definitions.entities.push(decode(kind, name, content)?),
            SOURCE => registered.definitions.sources.push(decode(kind, name, content)?),
            FEATURE_VIEW => registered.definitions.views.push(decode(kind, name, content)?),
            FEATURE_SERVICE => registered.definitions.services.push(decode(kind, name, content)?),
            other => {
                return Err(FeatureStoreError::InvalidInput(format!(
                    "the catalog holds a '{other}' named '{name}' in namespace '{NAMESPACE}'; expected one of {ENTITY}, {SOURCE}, {FEATURE_VIEW}, {FEATURE_SERVICE}"
                )));
            }
        }
        registered.versions.insert((entry.kind, entry.name), applied);
    }
    Ok(registered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definitions::parse_definitions;

    #[test]
    fn definitions_survive_the_round_trip_through_catalog_entries() {
        let text = include_str!("../../examples/features/driver.toml");
        let mut definitions = parse_definitions("driver.toml", text).unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features");
        definitions.resolve_paths(&examples).unwrap();
        for source in &definitions.sources {
            if let SourceKind::File { path } = &source.kind {
                assert!(Path::new(path).is_absolute(), "{path}");
                assert!(Path::new(path).exists(), "{path}");
            }
        }
        let entries = to_entries(&definitions);
        let count = definitions.entities.len()
            + definitions.sources.len()
            + definitions.views.len()
            + definitions.services.len();
        assert_eq!(entries.len(), count);
        let applied = Applied {
            version: 3,
            applied_at_ms: 7,
        };
        let registered = from_entries(entries.into_iter().map(|entry| (entry, applied))).unwrap();
        assert_eq!(registered.definitions, definitions);
        let view = &definitions.views[0].name;
        assert_eq!(registered.version_of(FEATURE_VIEW, view), Some(applied));
        assert_eq!(registered.version_of(FEATURE_SERVICE, view), None);
    }

    #[test]
    fn an_unknown_kind_or_unreadable_content_is_named() {
        let unknown = RegistryEntry {
            kind: "model".into(),
            name: "m".into(),
            content: "{}".into(),
        };
        let applied = Applied {
            version: 1,
            applied_at_ms: 0,
        };
        let error = from_entries([(unknown, applied)]).unwrap_err().to_string();
        assert!(error.contains("'model' named 'm'"), "{error}");
        let garbled = RegistryEntry {
            kind: FEATURE_VIEW.into(),
            name: "v".into(),
            content: "{\"name\": 1}".into(),
        };
        let error = from_entries([(garbled, applied)]).unwrap_err().to_string();
        assert!(error.contains("feature_view 'v'"), "{error}");
    }
}
