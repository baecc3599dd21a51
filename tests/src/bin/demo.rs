//! One-command demo on a machine with RabbitMQ and PostgreSQL and no Bitrix24
//! account: `cargo run --release -p b24-tests --bin demo`. It starts the ingress, a
//! worker and a simulated portal, sends the Bitrix24 documentation's seed events, and
//! prints what landed where. It keeps running for a look at the metrics until Ctrl-C
//! (or exits at once with `--exit`), then removes its queues and database.

#[tokio::main]
async fn main() {
    let exit_at_once = std::env::args().any(|a| a == "--exit");
    println!("starting the ingress, a worker and a simulated Bitrix24 portal...");
    let (pipeline, report) = b24_tests::demo::run().await;
    println!("{}", report.render());
    if !exit_at_once {
        println!("running; press Ctrl-C to stop and clean up");
        let _ = tokio::signal::ctrl_c().await;
    }
    pipeline.finish().await;
    println!("stopped; the demo's queues and database are removed");
}
