//! PostgreSQL: the pool, creating the database if it is missing, and the embedded
//! migrations. Replicas start together, so migrations run under an advisory lock and
//! each is recorded once; `CREATE DATABASE` racing another replica is not an error.

use crate::Secret;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub use deadpool_postgres::{Object as Client, Pool as DbPool, PoolError};

/// Migrations in order; a released one is never edited, only followed by a new one.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../migrations/0001_init.sql")),
    ("0002_trust", include_str!("../migrations/0002_trust.sql")),
];

/// Any constant: the key of the advisory lock that serializes migrations.
const MIGRATION_LOCK: i64 = 0x0062_3234_7069_7065;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL")]
    BadUrl,
    #[error("database: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

/// tokio-postgres prints only "db error"; the server's code and message are what an
/// operator needs (they never contain parameter values).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Builds the pool (lazy: no connection is made here).
pub fn pool(url: &Secret, max_size: usize) -> Result<Pool, DbError> {
    let config: tokio_postgres::Config = url.expose().parse().map_err(|_| DbError::BadUrl)?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        // A database that does not answer makes its caller fail and retry later; it never
        // hangs a task (a worker's shutdown included).
        .wait_timeout(Some(std::time::Duration::from_secs(30)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .recycle_timeout(Some(std::time::Duration::from_secs(5)))
        .build()?)
}

/// Creates the database named in `url` if it does not exist, connecting to the
/// `postgres` maintenance database of the same server.
pub async fn create_database_if_missing(url: &Secret) -> Result<(), DbError> {
    let config: tokio_postgres::Config = url.expose().parse().map_err(|_| DbError::BadUrl)?;
    let Some(name) = config.get_dbname().map(str::to_string) else {
        return Ok(());
    };
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(NoTls).await?;
    let driver = tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database, 23505: another replica won the race.
            Err(e)
                if e.code()
                    .is_some_and(|c| c.code() == "42P04" || c.code() == "23505") => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Applies the embedded migrations that have not run yet, under an advisory lock.
pub async fn migrate(pool: &Pool) -> Result<(), DbError> {
    let mut client = pool.get().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     name text PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        for (name, sql) in MIGRATIONS {
            let tx = client.transaction().await?;
            let done = tx
                .query_opt("SELECT 1 FROM schema_migrations WHERE name = $1", &[name])
                .await?
                .is_some();
            if !done {
                tx.batch_execute(sql).await?;
                tx.execute("INSERT INTO schema_migrations (name) VALUES ($1)", &[name])
                    .await?;
                tracing::info!(migration = name, "applied migration");
            }
            tx.commit().await?;
        }
        Ok::<_, DbError>(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}
