use b24_ingress::App;
use b24_shared::config::IngressConfig;
use b24_shared::shutdown_signal;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    b24_shared::telemetry::init();
    let config = IngressConfig::from_env()?;
    let app = App::build(config).await?;
    tracing::info!(addr = %app.local_addr(), "ingress listening");
    app.run_until_stopped(shutdown_signal()).await;
    Ok(())
}
