//! Prometheus metrics of the master, and a minimal `/metrics` HTTP endpoint.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// One label, as `[(name, value)]`.
pub type Label = [(&'static str, &'static str); 1];

/// The master's counters. Cheap to clone; all clones count into the same values.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Piece payload bytes the master sent.
    pub piece_bytes_sent: Counter<u64, AtomicU64>,
    /// Assignments that redirected a node to a peer.
    pub redirects: Counter,
    /// All assignments handed out.
    pub assignments: Counter,
    /// Connected peers.
    pub peers: Gauge,
    /// Peers banned.
    pub bans: Counter,
    /// Files registered.
    pub files: Gauge,
    /// Verified bytes the master pulled from publishers.
    pub pulled_bytes: Counter<u64, AtomicU64>,
    /// Announces refused (untrusted publisher, quota, disk, bad manifest).
    pub announces_refused: Counter,
    /// Reports about a source that the master ignored, by `reason`.
    pub reports_ignored: Family<Label, Counter>,
    /// Reports about a source that matched an assignment, by `problem`.
    pub reports_counted: Family<Label, Counter>,
    /// Probes of suspects that ended, by `outcome`.
    pub probes: Family<Label, Counter>,
    /// Probes dropped because the probe queue was full.
    pub probes_dropped: Counter,
    /// Probes running or waiting to run.
    pub probes_pending: Gauge,
    /// Bytes the relay carried for nodes behind NAT (both directions of every circuit).
    pub relayed_bytes: Counter<u64, AtomicU64>,
    /// Nodes listening through the relay (reservations held).
    pub relay_reservations: Gauge,
    /// Circuits open through the relay.
    pub relay_circuits: Gauge,
    /// Circuits and reservations the relay refused (caps reached, rate limits).
    pub relay_refused: Counter,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in their own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal_master");
        let piece_bytes_sent = Counter::<u64, AtomicU64>::default();
        let redirects = Counter::default();
        let assignments = Counter::default();
        let peers = Gauge::default();
        let bans = Counter::default();
        let files = Gauge::default();
        let pulled_bytes = Counter::<u64, AtomicU64>::default();
        let announces_refused = Counter::default();
        registry.register(
            "pulled_bytes",
            "Verified bytes pulled from publishers",
            pulled_bytes.clone(),
        );
        registry.register(
            "announces_refused",
            "Announces refused (trust, quota, disk, bad manifest)",
            announces_refused.clone(),
        );
        let reports_ignored = Family::<Label, Counter>::default();
        let reports_counted = Family::<Label, Counter>::default();
        let probes = Family::<Label, Counter>::default();
        let probes_dropped = Counter::default();
        let probes_pending = Gauge::default();
        registry.register(
            "piece_bytes_sent",
            "Piece payload bytes the master sent",
            piece_bytes_sent.clone(),
        );
        registry.register(
            "redirects",
            "Assignments that redirected a node to a peer",
            redirects.clone(),
        );
        registry.register(
            "assignments",
            "Assignments handed out (master or peer)",
            assignments.clone(),
        );
        registry.register("peers", "Connected peers", peers.clone());
        registry.register("bans", "Peers banned swarm-wide", bans.clone());
        registry.register("files", "Files registered", files.clone());
        registry.register(
            "reports_ignored",
            "Reports about a source that the master ignored, by reason",
            reports_ignored.clone(),
        );
        registry.register(
            "reports_counted",
            "Reports about a source that matched an assignment, by problem",
            reports_counted.clone(),
        );
        registry.register(
            "probes",
            "Probes of suspects that ended, by outcome",
            probes.clone(),
        );
        registry.register(
            "probes_dropped",
            "Probes dropped because the probe queue was full",
            probes_dropped.clone(),
        );
        registry.register(
            "probes_pending",
            "Probes running or waiting to run",
            probes_pending.clone(),
        );
        let relayed_bytes = Counter::<u64, AtomicU64>::default();
        let relay_reservations = Gauge::default();
        let relay_circuits = Gauge::default();
        let relay_refused = Counter::default();
        registry.register(
            "relayed_bytes",
            "Bytes the relay carried for nodes behind NAT, both directions",
            relayed_bytes.clone(),
        );
        registry.register(
            "relay_reservations",
            "Nodes listening through the relay",
            relay_reservations.clone(),
        );
        registry.register(
            "relay_circuits",
            "Circuits open through the relay",
            relay_circuits.clone(),
        );
        registry.register(
            "relay_refused",
            "Relay reservations and circuits refused (caps, rate limits)",
            relay_refused.clone(),
        );
        Self {
            relayed_bytes,
            relay_reservations,
            relay_circuits,
            relay_refused,
            piece_bytes_sent,
            redirects,
            assignments,
            peers,
            bans,
            files,
            pulled_bytes,
            announces_refused,
            reports_ignored,
            reports_counted,
            probes,
            probes_dropped,
            probes_pending,
            registry: Arc::new(registry),
        }
    }

    /// Counts a report ignored for `reason`.
    pub fn report_ignored(&self, reason: &'static str) {
        self.reports_ignored
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// How many reports were ignored for `reason`.
    pub fn reports_ignored_for(&self, reason: &'static str) -> u64 {
        self.reports_ignored
            .get_or_create(&[("reason", reason)])
            .get()
    }

    /// How many reports of `problem` matched an assignment.
    pub fn reports_counted_for(&self, problem: &'static str) -> u64 {
        self.reports_counted
            .get_or_create(&[("problem", problem)])
            .get()
    }

    /// How many probes ended with `outcome`.
    pub fn probes_for(&self, outcome: &'static str) -> u64 {
        self.probes.get_or_create(&[("outcome", outcome)]).get()
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `GET /metrics` on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let body = self.render();
            // One scrape at a time, each bounded by a timeout: a scraper cannot pile up tasks.
            async move {
                let mut req = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut req),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let line = String::from_utf8_lossy(&req[..n]);
                let resp = if line.starts_with("GET /metrics") {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = sock.write_all(resp.as_bytes()).await;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_with_the_documented_names() {
        let m = Metrics::new();
        m.piece_bytes_sent.inc_by(1234);
        m.redirects.inc();
        m.report_ignored("not_assigned");
        let addr = m
            .spawn_server("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sock.read_to_string(&mut body),
        )
        .await
        .expect("metrics answer within 5 s")
        .unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        for name in [
            "shoal_master_piece_bytes_sent_total 1234",
            "shoal_master_redirects_total 1",
            "shoal_master_assignments_total 0",
            "shoal_master_peers 0",
            "shoal_master_bans_total 0",
            "shoal_master_pulled_bytes_total 0",
            "shoal_master_announces_refused_total 0",
            "shoal_master_reports_ignored_total{reason=\"not_assigned\"} 1",
            "shoal_master_relayed_bytes_total 0",
            "shoal_master_relay_reservations 0",
            "shoal_master_relay_circuits 0",
            "shoal_master_relay_refused_total 0",
        ] {
            assert!(body.contains(name), "missing {name:?} in:\n{body}");
        }
    }
}
