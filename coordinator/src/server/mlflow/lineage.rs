//! Kiln's lineage endpoint beside the MLflow API ([`crate::lineage`]):
//!
//! ```text
//!   GET /api/2.0/kiln/lineage?id=NAME[&direction=upstream|downstream|both][&format=json|dot]
//! ```
//!
//! `id` is what `kiln lineage` takes: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, a run id, a dataset
//! digest (or a prefix of either), `job:ID`, or a node id. JSON is `{"root", "direction", "nodes": [...],
//! "edges": [{"from", "to"}]}`; DOT is Graphviz.

use crate::lineage::{Direction, Graph};

use super::*;

pub(super) fn routes() -> axum::Router<Tracker> {
    axum::Router::new().route("/api/2.0/kiln/lineage", get(lineage))
}

async fn lineage(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    let fields = Fields(query_of(query));
    let answer = async {
        let name = fields.required_text("id")?;
        let direction_text = fields.text("direction")?.unwrap_or_default();
        let direction = Direction::parse(&direction_text)?;
        let dot = match fields.text("format")?.as_deref() {
            None | Some("json") => false,
            Some("dot") => true,
            Some(other) => return Err(invalid(format!("'format' is '{other}'; expected json or dot"))),
        };
        let tracking = tracker.read().await?;
        let graph = Graph::of(&tracking);
        let root = graph.resolve(&tracking, &name)?;
        let around = graph.around(&root, direction);
        Ok((dot, root, direction_text, around))
    }
    .await;
    match answer {
        Ok((true, root, _, around)) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/vnd.graphviz")
            .body(Body::from(around.to_dot(&root)))
            .expect("a valid response"),
        Ok((false, root, direction, around)) => respond(Ok(json!({
            "root": root,
            "direction": if direction.is_empty() { "both".to_string() } else { direction },
            "nodes": around.nodes.values().collect::<Vec<_>>(),
            "edges": around.edges,
        }))),
        Err(failure) => respond(Err(failure)),
    }
}
