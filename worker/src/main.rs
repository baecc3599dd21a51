use b24_shared::shutdown_signal;
use b24_worker::{dlq, App, WorkerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    b24_shared::telemetry::init();
    let config = WorkerConfig::from_env()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => {
            let app = App::build(config).await?;
            tracing::info!(metrics = %app.metrics_addr(), "worker started");
            app.run_until_stopped(shutdown_signal()).await;
            Ok(())
        }
        ["dlq", "list", rest @ ..] => dlq::list(&config.amqp, dlq::parse_limit(rest)?).await,
        ["dlq", "replay", rest @ ..] => {
            let n = dlq::replay(&config.amqp, dlq::parse_limit(rest)?).await?;
            println!("replayed {n} message(s)");
            Ok(())
        }
        _ => {
            eprintln!("usage: worker                       run the worker");
            eprintln!("       worker dlq list [--limit N]   show dead letters (tokens redacted)");
            eprintln!("       worker dlq replay [--limit N] move dead letters back to work");
            std::process::exit(2)
        }
    }
}
