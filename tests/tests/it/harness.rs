//! The harness itself: a test that fails part-way must leave nothing behind.

use b24_tests::pipeline::{pg_base, Pipeline};
use tokio_postgres::NoTls;

#[tokio::test]
async fn a_pipeline_dropped_without_finishing_leaves_no_database_and_no_queues() {
    let (database, queue) = {
        let p = Pipeline::start("h-drop", 1, &[]).await;
        p.install_seed_portal().await;
        assert!(
            b24_tests::broker::queue_exists(&p.ingress.topology.work_queue())
                .await
                .unwrap()
        );
        (p.db.name.clone(), p.ingress.topology.work_queue())
        // Dropped here without `finish`, as a panicking test's pipeline is.
    };
    let (client, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "database {database} dropped");
    assert!(
        !b24_tests::broker::queue_exists(&queue).await.unwrap(),
        "queue {queue} deleted"
    );
}
