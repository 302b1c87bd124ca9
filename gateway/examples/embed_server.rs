//! The OpenAI API inside an application's own tokio runtime: ferry's server
//! (HTTP/1.1, HTTP/2, and HTTP/3 over QUIC) with a shutdown the application owns.
//!
//!     cargo run --release --example embed_server -- [MODEL.gguf]
//!
//! Then `curl http://127.0.0.1:8000/v1/models`; Ctrl-C stops it.

use ferry::server::ServeConfig;
use ferry::{Llm, Server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut builder = Llm::builder();
    if let Some(m) = std::env::args().nth(1) {
        builder = builder.model(m);
    }
    let llm = builder.build().await?;
    let cfg = ServeConfig { host: "127.0.0.1".into(), port: 8000, tls_port: Some(8443), ..Default::default() };
    let server = Server::new(&llm)
        .config(cfg)
        .start(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    println!("serving on http://{} (HTTP/3 on udp {:?})", server.http_addr(), server.tls_port());
    server.wait().await?;
    llm.shutdown().await;
    Ok(())
}
