//! A node's Prometheus metrics (`shoal fetch --metrics-addr`, `shoal seed --metrics-addr`):
//! bytes in by source, bytes out, progress of the current download, rendered on request from
//! the live counters, and a minimal `/metrics` HTTP endpoint.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{progress::FetchProgress, Client};

/// What the endpoint reads from.
#[derive(Clone)]
pub struct NodeMetrics {
    client: Client,
    fetch: Option<Arc<FetchProgress>>,
}

impl NodeMetrics {
    /// Metrics of `client`, and of the download `fetch` counts, if any.
    pub fn new(client: Client, fetch: Option<Arc<FetchProgress>>) -> Self {
        Self { client, fetch }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        metric(
            "shoal_node_piece_bytes_uploaded_total",
            "counter",
            "Piece payload bytes this node served to others",
            &[("", self.client.bytes_uploaded())],
        );
        if let Some(f) = &self.fetch {
            let s = f.snapshot();
            metric(
                "shoal_node_piece_bytes_received_total",
                "counter",
                "Verified piece bytes received in this run, by source",
                &[
                    ("{source=\"master\"}", s.bytes_from_master),
                    ("{source=\"peers\"}", s.bytes_from_peers),
                ],
            );
            metric(
                "shoal_node_blocks_verified_total",
                "counter",
                "Blocks received and verified in this run",
                &[("", s.blocks_verified)],
            );
            metric(
                "shoal_node_download_bytes",
                "gauge",
                "Size of the file being fetched",
                &[("", s.total_bytes)],
            );
            metric(
                "shoal_node_download_held_bytes",
                "gauge",
                "Bytes of it verified on disk (resumed and fetched)",
                &[("", s.held())],
            );
            metric(
                "shoal_node_download_resumed_blocks",
                "gauge",
                "Blocks already verified on disk when the fetch started",
                &[("", s.blocks_resumed)],
            );
        }
        out
    }

    /// Serves `GET /metrics` on `listener`, one scrape at a time, each bounded by a 5 s
    /// timeout, until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut req = [0u8; 1024];
                let n = sock.read(&mut req).await.ok()?;
                let resp = if req[..n].starts_with(b"GET /metrics") {
                    let body = self.render();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                sock.write_all(resp.as_bytes()).await.ok()
            })
            .await;
        }
    }

    /// Binds `addr` and serves in a background task; returns the bound address.
    pub async fn spawn_server(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(self.clone().serve(listener));
        Ok(bound)
    }
}
