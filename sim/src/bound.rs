//! The lower bound on a flash crowd's completion (Kumar and Ross, 2006).
//!
//! With `N` nodes, a file of `F` bytes, a server upload `u_s`, node uploads `u_i` and the
//! slowest download `d_min`, no schedule can have every node done before
//! `max(F / u_s, F / d_min, N F / (u_s + sum u_i))`: every byte leaves the server once, the
//! slowest node must receive `F`, and `N F` bytes must be uploaded in all. The first two terms
//! also hold for each node alone (`F / u_s` and `F / d_i`): no node can be done before every
//! block has left the server, nor before its own link could carry the file.

use crate::scenario::Scenario;

/// `max(F/u_s, F/d_min, N F/(u_s + sum u_i))`, in seconds. Rates in bytes/s.
pub fn kumar_ross(file: f64, server_up: f64, uploads: &[f64], downloads: &[f64]) -> f64 {
    let n = uploads.len() as f64;
    let d_min = downloads.iter().copied().fold(f64::INFINITY, f64::min);
    let sum_u: f64 = uploads.iter().sum();
    let mut b = file / server_up;
    if d_min.is_finite() && d_min > 0.0 {
        b = b.max(file / d_min);
    }
    b.max(n * file / (server_up + sum_u))
}

/// The bound for a scenario's nodes, taking each group's capacities at their mean (uniform:
/// midpoint; list: mean) and the lowest possible download. Use [`kumar_ross`] with the drawn
/// capacities for the bound of one run.
pub fn lower_bound(sc: &Scenario) -> f64 {
    use crate::scenario::Capacity;
    let mean = |c: &Capacity| match c {
        Capacity::Fixed(r) => r.0,
        Capacity::Uniform { min, max } => (min.0 + max.0) / 2.0,
        Capacity::Choice(v) => v.iter().map(|r| r.0).sum::<f64>() / v.len().max(1) as f64,
    };
    let mut ups = Vec::new();
    let mut downs = Vec::new();
    for g in &sc.groups {
        for _ in 0..g.count {
            ups.push(mean(&g.upload));
            downs.push(g.download.min());
        }
    }
    kumar_ross(sc.file.size.0 as f64, sc.master.upload.0, &ups, &downs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_term_binds_in_its_own_case() {
        // The benchmark crowd: 12 nodes, 64 MiB, server 8 MiB/s, nodes 4 MiB/s, fast
        // downloads: N F / (u_s + N u) = 12 * 64 / (8 + 48) = 13.71 s.
        let mib = 1048576.0;
        let b = kumar_ross(64.0 * mib, 8.0 * mib, &[4.0 * mib; 12], &[1e12; 12]);
        assert!((b - 12.0 * 64.0 / 56.0).abs() < 1e-9, "{b}");
        // A slow server and fast peers: F / u_s.
        let b = kumar_ross(100.0, 1.0, &[1000.0; 3], &[1e9; 3]);
        assert_eq!(b, 100.0);
        // One slow download: F / d_min.
        let b = kumar_ross(100.0, 1000.0, &[1000.0; 3], &[1e9, 2.0, 1e9]);
        assert_eq!(b, 50.0);
        // Nodes that upload nothing: everything from the server, N F / u_s.
        let b = kumar_ross(100.0, 10.0, &[0.0; 4], &[1e9; 4]);
        assert_eq!(b, 40.0);
    }
}
