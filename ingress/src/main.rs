use b24_ingress::{shutdown_signal, App};
use b24_shared::config::IngressConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    b24_shared::telemetry::init();
    let config = IngressConfig::from_env()?;
    let app = App::build(config).await?;
    tracing::info!(addr = %app.local_addr(), "ingress listening");
    app.run_until_stopped(shutdown_signal()).await;
    Ok(())
}
