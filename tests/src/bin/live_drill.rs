//! The live observability drill, run by `deploy/live-check.sh` (which starts
//! Prometheus and sets the environment this reads: see `b24_tests::live`). Exits
//! non-zero naming every dashboard panel or alert rule that got no data.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = b24_tests::live::LiveConfig::from_env()?;
    b24_tests::live::run(config).await?;
    println!("live: every panel query and every alert rule saw data");
    Ok(())
}
