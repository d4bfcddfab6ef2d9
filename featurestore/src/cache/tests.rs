use datafusion::arrow::array::{Array, Float64Array, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{SessionConfig, SessionContext};

use super::*;

/// An Arrow IPC file of `batches` batches of `rows` rows: `id` counts up from `first`, `x` is `id * scale`.
fn write_file(path: &Path, first: i64, batches: usize, rows: usize, scale: f64) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
    ]));
    let file = std::fs::File::create(path).unwrap();
    let mut writer = datafusion::arrow::ipc::writer::FileWriter::try_new(file, &schema).unwrap();
    for batch in 0..batches {
        let start = first + (batch * rows) as i64;
        let ids: Vec<i64> = (start..start + rows as i64).collect();
        let xs: Vec<f64> = ids.iter().map(|id| *id as f64 * scale).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(ids)), Arc::new(Float64Array::from(xs))],
        )
        .unwrap();
        writer.write(&batch).unwrap();
    }
    writer.finish().unwrap();
}

async fn context(path: &Path, cache: &Arc<SourceCache>, partitions: usize) -> SessionContext {
    let context = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(partitions));
    crate::definitions::register_file_cached(&context, "t", path, Some(cache))
        .await
        .unwrap();
    context
}

async fn query(context: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    context.sql(sql).await.unwrap().collect().await.unwrap()
}

fn ids(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|batch| {
            let column = batch.column_by_name("id").unwrap();
            column.as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
        })
        .collect()
}

#[tokio::test]
async fn a_file_is_read_once_and_its_buffers_handed_out_again_until_it_changes() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("t.arrow");
    write_file(&path, 0, 4, 1000, 1.0);
    let cache = Arc::new(SourceCache::new(DEFAULT_BUDGET_BYTES));

    // Four scans at once read the file once.
    let contexts = [
        context(&path, &cache, 1).await,
        context(&path, &cache, 1).await,
        context(&path, &cache, 2).await,
        context(&path, &cache, 2).await,
    ];
    let counts =
        futures::future::join_all(contexts.iter().map(|context| query(context, "SELECT count(*) FROM t"))).await;
    for count in counts {
        assert_eq!(
            count[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0),
            4000
        );
    }
    assert_eq!(cache.reads(), 1);

    let first = query(&context(&path, &cache, 1).await, "SELECT id, x FROM t").await;
    assert_eq!(
        ids(&first),
        (0..4000).collect::<Vec<_>>(),
        "one partition: the file's order"
    );
    let (bytes, files) = cache.held();
    assert_eq!(files, 1);
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        bytes >= 4000 * 16 && bytes <= file_bytes,
        "{bytes} bytes held for a file of {file_bytes}"
    );

    // The same buffers, not a copy: the second scan's first column starts where the first one's did.
    let again = query(&context(&path, &cache, 1).await, "SELECT id, x FROM t").await;
    assert_eq!(
        again[0].column(0).to_data().buffers()[0].as_ptr(),
        first[0].column(0).to_data().buffers()[0].as_ptr()
    );

    // Two partitions: every row once, and each partition in file order.
    let parallel = query(
        &context(&path, &cache, 2).await,
        "SELECT sum(id) AS s, count(*) AS n FROM t",
    )
    .await;
    let sum = parallel[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(sum, (0..4000).sum::<i64>());

    // Rewritten with other rows (another length): the next scan reads the new file.
    write_file(&path, 10_000, 3, 500, 2.0);
    let rewritten = query(&context(&path, &cache, 1).await, "SELECT id, x FROM t WHERE id < 10002").await;
    assert_eq!(ids(&rewritten), vec![10_000, 10_001]);
    let x = rewritten[0].column(1).as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(x.value(1), 20_002.0);
    assert_eq!(cache.held().1, 1);
    assert_eq!(cache.reads(), 2);
}

#[tokio::test]
async fn files_beyond_the_budget_stream_from_disk_and_the_least_recently_used_goes_first() {
    let directory = tempfile::tempdir().unwrap();
    let (a, b) = (directory.path().join("a.arrow"), directory.path().join("b.arrow"));
    write_file(&a, 0, 2, 1000, 1.0);
    write_file(&b, 5000, 2, 1000, 1.0);
    let file_bytes = std::fs::metadata(&a).unwrap().len() as usize;

    // Room for one file: reading b lets a go.
    let cache = Arc::new(SourceCache::new(file_bytes + file_bytes / 2));
    assert_eq!(
        ids(&query(&context(&a, &cache, 1).await, "SELECT id FROM t").await).len(),
        2000
    );
    assert_eq!(
        ids(&query(&context(&b, &cache, 1).await, "SELECT id FROM t").await)[0],
        5000
    );
    assert_eq!(cache.held().1, 1);
    let held_b = query(&context(&b, &cache, 1).await, "SELECT id FROM t").await;
    assert_eq!(cache.held().1, 1);

    // A budget below the file's size: the file is read batch by batch as it is scanned; nothing is held.
    let small = Arc::new(SourceCache::new(file_bytes / 2));
    let streamed = query(&context(&a, &small, 1).await, "SELECT id FROM t ORDER BY id").await;
    assert_eq!(ids(&streamed), (0..2000).collect::<Vec<_>>());
    let in_order = query(&context(&a, &small, 1).await, "SELECT id FROM t").await;
    assert_eq!(
        ids(&in_order),
        (0..2000).collect::<Vec<_>>(),
        "one partition: the file's order"
    );
    let mut parts = ids(&query(&context(&a, &small, 3).await, "SELECT id FROM t").await);
    parts.sort_unstable();
    assert_eq!(
        parts,
        (0..2000).collect::<Vec<_>>(),
        "several partitions: every row once"
    );
    let limited = query(&context(&a, &small, 1).await, "SELECT id FROM t LIMIT 5").await;
    assert_eq!(ids(&limited), vec![0, 1, 2, 3, 4]);
    assert_eq!(small.held(), (0, 0));

    // Lowering the budget lets what no longer fits go.
    cache.set_budget(0);
    assert_eq!(cache.held(), (0, 0));
    assert_eq!(ids(&held_b).len(), 2000, "batches already handed out stay valid");
}

#[test]
fn runs_are_contiguous_cover_every_batch_once_and_number_at_most_the_partitions() {
    // (batches, partitions, the runs as (first, end) pairs)
    type Case = (usize, usize, &'static [(usize, usize)]);
    let cases: [Case; 6] = [
        (0, 2, &[(0, 0)]),
        (1, 4, &[(0, 1)]),
        (5, 1, &[(0, 5)]),
        (5, 2, &[(0, 3), (3, 5)]),
        (4, 8, &[(0, 1), (1, 2), (2, 3), (3, 4)]),
        (7, 0, &[(0, 7)]),
    ];
    for (count, partitions, expected) in cases {
        assert_eq!(
            runs(count, partitions)
                .map(|run| (run.start, run.end))
                .collect::<Vec<_>>(),
            expected,
            "{count} batches, {partitions} partitions"
        );
    }
}
