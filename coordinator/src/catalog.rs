//! The catalog: named, versioned documents that other services keep in the replicated state (the feature
//! store's entities, sources, views and services today). The coordinator treats each document's content
//! as opaque text: what it means, and whether it is valid, is the owning service's business, checked
//! before it is applied.
//!
//! ```text
//!   (namespace, kind, name) ──► versions 1, 2, 3 …   each a content, the time it was applied, or a deletion
//! ```
//!
//! Invariants:
//! - An apply is all or nothing: every object of the request is checked before any changes.
//! - A version is never rewritten: new content appends the next version; content equal to the current
//!   version changes nothing, so a retried apply is harmless.
//! - A deletion is a version too (a tombstone), so what a training set or model pointed at stays readable.

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;

/// Longest accepted namespace, kind or name.
pub const CATALOG_NAME_LENGTH_MAX: usize = 128;
/// Largest accepted content of one object, and of one apply in all, so the replicated state stays small.
pub const CATALOG_CONTENT_BYTES_MAX: usize = 256 * 1024;
pub const CATALOG_APPLY_BYTES_MAX: usize = 3 * 1024 * 1024;
/// Most objects one apply may carry.
pub const CATALOG_APPLY_OBJECTS_MAX: usize = 10_000;

/// One object as a client submits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDraft {
    pub kind: String,
    pub name: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectVersion {
    /// 1 for the first content, then one more for each change (a deletion included).
    pub version: u32,
    /// Empty for a deletion.
    pub content: String,
    pub applied_at_ms: i64,
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogObject {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    /// Oldest first; never empty.
    pub versions: Vec<ObjectVersion>,
}

impl CatalogObject {
    pub fn current(&self) -> &ObjectVersion {
        self.versions.last().expect("a catalog object has at least one version")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectChange {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

impl ObjectChange {
    pub fn label(self) -> &'static str {
        match self {
            ObjectChange::Created => "created",
            ObjectChange::Updated => "updated",
            ObjectChange::Unchanged => "unchanged",
            ObjectChange::Deleted => "deleted",
        }
    }
}

/// What an apply did to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedObject {
    pub kind: String,
    pub name: String,
    pub version: u32,
    pub change: ObjectChange,
}

type ObjectKey = (String, String, String);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    objects: imbl::OrdMap<ObjectKey, CatalogObject>,
}

fn check_name(what: &str, value: &str) -> Result<(), CoordinatorError> {
    let valid = !value.is_empty()
        && value.len() <= CATALOG_NAME_LENGTH_MAX
        && value
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "_-.:/".contains(character));
    if valid {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "catalog {what} {value:?} is not valid; expected 1 to {CATALOG_NAME_LENGTH_MAX} letters, digits or _-.:/"
        )))
    }
}

/// Checks a request without the state: names, sizes, duplicates. Run before proposing, and again in apply.
pub fn check_request(namespace: &str, objects: &[ObjectDraft]) -> Result<(), CoordinatorError> {
    check_name("namespace", namespace)?;
    if objects.len() > CATALOG_APPLY_OBJECTS_MAX {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{} objects in one apply; at most {CATALOG_APPLY_OBJECTS_MAX} are accepted",
            objects.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0usize;
    for object in objects {
        check_name("kind", &object.kind)?;
        check_name("name", &object.name)?;
        if object.content.is_empty() || object.content.len() > CATALOG_CONTENT_BYTES_MAX {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{} '{}' has {} bytes of content; expected 1 to {CATALOG_CONTENT_BYTES_MAX}",
                object.kind,
                object.name,
                object.content.len()
            )));
        }
        total += object.content.len();
        if !seen.insert((object.kind.as_str(), object.name.as_str())) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{} '{}' appears twice in one apply",
                object.kind, object.name
            )));
        }
    }
    if total > CATALOG_APPLY_BYTES_MAX {
        return Err(CoordinatorError::InvalidArgument(format!(
            "one apply carries {total} bytes of content; at most {CATALOG_APPLY_BYTES_MAX} are accepted"
        )));
    }
    Ok(())
}

impl Catalog {
    /// Applies `objects` to `namespace` at once. With `replace`, the namespace's live objects that are not
    /// in `objects` are deleted. Returns what happened to each object, in (kind, name) order.
    pub fn apply(
        &mut self,
        namespace: &str,
        objects: Vec<ObjectDraft>,
        replace: bool,
        now_ms: i64,
    ) -> Result<Vec<AppliedObject>, CoordinatorError> {
        check_request(namespace, &objects)?;
        let mut applied = Vec::new();
        let mut named = std::collections::BTreeSet::new();
        for draft in objects {
            let key = (namespace.to_string(), draft.kind.clone(), draft.name.clone());
            named.insert(key.clone());
            let change = match self.objects.get_mut(&key) {
                None => {
                    self.objects.insert(
                        key,
                        CatalogObject {
                            namespace: namespace.to_string(),
                            kind: draft.kind.clone(),
                            name: draft.name.clone(),
                            versions: vec![ObjectVersion {
                                version: 1,
                                content: draft.content,
                                applied_at_ms: now_ms,
                                deleted: false,
                            }],
                        },
                    );
                    (1, ObjectChange::Created)
                }
                Some(object) => {
                    let current = object.current();
                    if !current.deleted && current.content == draft.content {
                        (current.version, ObjectChange::Unchanged)
                    } else {
                        let change = if current.deleted {
                            ObjectChange::Created
                        } else {
                            ObjectChange::Updated
                        };
                        let version = current.version + 1;
                        object.versions.push(ObjectVersion {
                            version,
                            content: draft.content,
                            applied_at_ms: now_ms,
                            deleted: false,
                        });
                        (version, change)
                    }
                }
            };
            applied.push(AppliedObject {
                kind: draft.kind,
                name: draft.name,
                version: change.0,
                change: change.1,
            });
        }
        if replace {
            let stale: Vec<ObjectKey> = self
                .namespace(namespace)
                .filter(|object| !object.current().deleted)
                .map(|object| (object.namespace.clone(), object.kind.clone(), object.name.clone()))
                .filter(|key| !named.contains(key))
                .collect();
            for key in stale {
                let object = self.objects.get_mut(&key).expect("listed just now");
                let version = object.current().version + 1;
                object.versions.push(ObjectVersion {
                    version,
                    content: String::new(),
                    applied_at_ms: now_ms,
                    deleted: true,
                });
                applied.push(AppliedObject {
                    kind: key.1,
                    name: key.2,
                    version,
                    change: ObjectChange::Deleted,
                });
            }
        }
        applied.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
        Ok(applied)
    }

    /// Every object of `namespace`, in (kind, name) order, deleted ones included.
    pub fn namespace<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a CatalogObject> + 'a {
        let start = (namespace.to_string(), String::new(), String::new());
        self.objects
            .range(start..)
            .take_while(move |(key, _)| key.0 == namespace)
            .map(|(_, object)| object)
    }

    /// The objects of `namespace`: without `include_deleted`, only those whose current version is live;
    /// without `include_history`, each with its current version only.
    pub fn list(&self, namespace: &str, include_deleted: bool, include_history: bool) -> Vec<CatalogObject> {
        self.namespace(namespace)
            .filter(|object| include_deleted || !object.current().deleted)
            .map(|object| {
                let mut object = object.clone();
                if !include_history {
                    object.versions = vec![object.current().clone()];
                }
                object
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(kind: &str, name: &str, content: &str) -> ObjectDraft {
        ObjectDraft {
            kind: kind.into(),
            name: name.into(),
            content: content.into(),
        }
    }

    fn changes(applied: &[AppliedObject]) -> Vec<(String, u32, &'static str)> {
        applied
            .iter()
            .map(|object| (object.name.clone(), object.version, object.change.label()))
            .collect()
    }

    #[test]
    fn a_change_is_a_new_version_and_an_equal_apply_changes_nothing() {
        let mut catalog = Catalog::default();
        let first = catalog
            .apply(
                "features",
                vec![draft("view", "a", "1"), draft("view", "b", "1")],
                true,
                10,
            )
            .unwrap();
        assert_eq!(
            changes(&first),
            vec![("a".into(), 1, "created"), ("b".into(), 1, "created")]
        );
        let before = catalog.clone();
        let again = catalog
            .apply(
                "features",
                vec![draft("view", "a", "1"), draft("view", "b", "1")],
                true,
                20,
            )
            .unwrap();
        assert_eq!(
            changes(&again),
            vec![("a".into(), 1, "unchanged"), ("b".into(), 1, "unchanged")]
        );
        assert_eq!(catalog, before);

        let second = catalog
            .apply("features", vec![draft("view", "a", "2")], true, 30)
            .unwrap();
        assert_eq!(
            changes(&second),
            vec![("a".into(), 2, "updated"), ("b".into(), 2, "deleted")]
        );
        let live = catalog.list("features", false, false);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].current().content, "2");
        let all = catalog.list("features", true, true);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].versions.len(), 2);
        assert_eq!(all[0].versions[0].content, "1", "old versions stay readable");
        assert!(all[1].current().deleted);

        // Back from the dead: a new version, never a rewritten one.
        let third = catalog
            .apply("features", vec![draft("view", "b", "1")], false, 40)
            .unwrap();
        assert_eq!(changes(&third), vec![("b".into(), 3, "created")]);
        assert_eq!(catalog.list("features", false, false).len(), 2);
    }

    #[test]
    fn namespaces_do_not_touch_each_other() {
        let mut catalog = Catalog::default();
        catalog.apply("a", vec![draft("view", "x", "1")], true, 1).unwrap();
        catalog.apply("b", vec![draft("view", "x", "2")], true, 1).unwrap();
        catalog.apply("a", vec![], true, 2).unwrap();
        assert!(catalog.list("a", false, false).is_empty());
        assert_eq!(catalog.list("b", false, false)[0].current().content, "2");
        assert!(catalog.list("c", true, true).is_empty());
    }

    #[test]
    fn bad_requests_are_refused_whole() {
        let mut catalog = Catalog::default();
        catalog
            .apply("features", vec![draft("view", "a", "1")], true, 1)
            .unwrap();
        let before = catalog.clone();
        let cases = [
            (
                "features",
                vec![draft("view", "a", "2"), draft("view", "a", "3")],
                "appears twice",
            ),
            ("features", vec![draft("view", "b", "")], "bytes of content"),
            ("features", vec![draft("view", "bad name", "1")], "name \"bad name\""),
            ("", vec![draft("view", "a", "1")], "namespace"),
            (
                "features",
                vec![
                    draft("view", "a", "2"),
                    draft("view", "big", &"x".repeat(CATALOG_CONTENT_BYTES_MAX + 1)),
                ],
                "bytes of content",
            ),
        ];
        for (namespace, objects, expected) in cases {
            let error = catalog.apply(namespace, objects, true, 2).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(catalog, before, "a refused apply changes nothing");
        }
    }
}
