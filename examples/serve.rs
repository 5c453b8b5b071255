//! fal's queue API inside your own tokio program, on the bundled tiny model:
//! `cargo run --release --example serve`, then `curl -X POST localhost:8000/fal-ai/pixart-sigma
//! -H 'content-type: application/json' -d '{"prompt": "a cat", "image_size": {"width": 64, "height": 64}}'`.
//! Ctrl-C stops it gracefully; nothing is kept (temporary storage). `PIXART_PORT` picks another
//! port (0: a free one).
use pixart_pipeline::{LoadOptions, Pipeline};
use pixart_server::{serve, ServerConfig, Storage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ServerConfig::default();
    config.storage = Storage::Temporary;
    // Loading reads gigabytes for a real model: off the async runtime.
    let load = || Pipeline::load("tests/fixtures/tiny-sigma-256", &LoadOptions::default());
    let pipeline = tokio::task::spawn_blocking(load).await??;
    let port: u16 = std::env::var("PIXART_PORT").map_or(Ok(8000), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = serve(Some(pipeline), "tiny-sigma-256".into(), config, None, listener, stop).await?;
    println!("served {:?}", report.counters);
    Ok(())
}
