//! The bandwidth model: links with capacities, flows across two links each (the sender's
//! upload, the receiver's download), and the rate of each flow.
//!
//! **Model ("local max-min", uploads first).** Each upload link's capacity is water-filled
//! among its flows, each flow capped at the *equal share* (capacity / flow count) of its
//! receiver's download link: `share_up`. Each download link's capacity is then water-filled
//! among its flows, each capped at its `share_up`: `share_down`. A flow runs at
//! `min(share_up, share_down)`. This is recomputed when a flow starts or ends, for the links
//! whose shares depend on the counts that changed: the flow's upload and the uploads of every
//! flow into its download, then the downloads of every flow out of those uploads.
//!
//! **Properties.** The rates on a link never add up to more than its capacity, so no transfer
//! is ever faster than physics allows (the lower bound holds). Where each flow's bottleneck is
//! its sender's upload or its receiver's download, and the other end shares evenly, it equals
//! max-min fairness.
//!
//! **Known errors.** (1) An upload caps each flow at its receiver's *equal* share, not at what
//! that download really has left: when some of a download's flows are held back by their
//! senders, the spare download capacity is not handed to its other flows' senders, so rates
//! can be *under*-estimated (never over). Uploads are the scarce links in the scenarios here,
//! where this matters least. (2) No TCP dynamics: no
//! slow start, no loss, a flow runs at its share from its first byte; latency is added once per
//! transfer (request plus first byte). (3) No core network: only access links are modelled.

/// A flow's handle.
pub type FlowId = usize;

/// A link's handle.
pub type LinkId = usize;

#[derive(Debug)]
struct Link {
    cap: f64,
    flows: Vec<FlowId>,
    stamp: u64,
}

#[derive(Debug)]
struct Flow {
    up: LinkId,
    down: LinkId,
    total: f64,
    remaining: f64,
    rate: f64,
    since: u64,
    version: u64,
    share_up: f64,
    share_down: f64,
}

/// A flow whose expected end moved: the engine schedules `(flow, version, at_ns)`; an end
/// event whose version is not the flow's current one is stale.
pub type Reschedule = (FlowId, u64, u64);

/// Links and the flows across them.
#[derive(Debug, Default)]
pub struct Net {
    links: Vec<Link>,
    flows: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    stamp: u64,
    versions: u64,
    observed: Option<LinkId>,
    /// Bytes sent on the observed link per second of virtual time.
    series: Vec<f64>,
    scratch_links: Vec<LinkId>,
    scratch_caps: Vec<(f64, FlowId)>,
}

impl Net {
    /// No links.
    pub fn new() -> Self {
        Self::default()
    }

    /// A link of `cap` bytes per second.
    pub fn add_link(&mut self, cap: f64) -> LinkId {
        self.links.push(Link {
            cap: cap.max(1.0),
            flows: Vec::new(),
            stamp: 0,
        });
        self.links.len() - 1
    }

    /// Records the bytes sent on `link` per second of virtual time (see [`Net::series`]).
    pub fn observe(&mut self, link: LinkId) {
        self.observed = Some(link);
    }

    /// Bytes sent on the observed link in each second of virtual time.
    pub fn series(&self) -> &[f64] {
        &self.series
    }

    /// Flows on `link` now.
    pub fn flows_on(&self, link: LinkId) -> usize {
        self.links[link].flows.len()
    }

    /// Starts a flow of `bytes` from `up` to `down` at `now` (ns); the reschedules (this flow's
    /// included) are appended to `out`.
    pub fn start(
        &mut self,
        now: u64,
        up: LinkId,
        down: LinkId,
        bytes: f64,
        out: &mut Vec<Reschedule>,
    ) -> FlowId {
        let flow = Flow {
            up,
            down,
            total: bytes,
            remaining: bytes,
            rate: 0.0,
            since: now,
            version: 0,
            share_up: 0.0,
            share_down: 0.0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        self.links[up].flows.push(id);
        self.links[down].flows.push(id);
        self.recompute(now, up, down, Some(id), out);
        id
    }

    /// Ends a flow at `now` (finished or aborted); returns the bytes it moved.
    pub fn stop(&mut self, now: u64, id: FlowId, out: &mut Vec<Reschedule>) -> f64 {
        self.settle(now, id);
        let Some(f) = self.flows.get_mut(id).and_then(|f| f.take()) else {
            return 0.0;
        };
        self.free.push(id);
        for l in [f.up, f.down] {
            let flows = &mut self.links[l].flows;
            if let Some(i) = flows.iter().position(|x| *x == id) {
                flows.swap_remove(i);
            }
        }
        self.recompute(now, f.up, f.down, None, out);
        (f.total - f.remaining.max(0.0)).max(0.0)
    }

    /// Whether `version` is the flow's current one (its end event is not stale). Versions
    /// are unique across flows, so an event of an ended flow never matches a later one.
    pub fn is_current(&self, id: FlowId, version: u64) -> bool {
        self.flows
            .get(id)
            .and_then(|f| f.as_ref())
            .is_some_and(|f| f.version == version)
    }

    /// Bytes moved so far by a flow.
    pub fn moved(&self, now: u64, id: FlowId) -> f64 {
        self.flows
            .get(id)
            .and_then(|f| f.as_ref())
            .map_or(0.0, |f| {
                let dt = now.saturating_sub(f.since) as f64 / 1e9;
                (f.total - (f.remaining - f.rate * dt).max(0.0)).max(0.0)
            })
    }

    /// A running flow's rate (bytes per second) and size, if it runs.
    pub fn rate_and_total(&self, id: FlowId) -> Option<(f64, f64)> {
        self.flows
            .get(id)
            .and_then(|f| f.as_ref())
            .map(|f| (f.rate, f.total))
    }

    /// A running flow's version and expected end (ns), as last scheduled.
    pub fn end_of(&self, id: FlowId) -> Option<(u64, u64)> {
        let f = self.flows.get(id)?.as_ref()?;
        (f.rate > 0.0).then(|| {
            let secs = f.remaining.max(0.0) / f.rate;
            (
                f.version,
                f.since.saturating_add((secs * 1e9).ceil() as u64),
            )
        })
    }

    fn settle(&mut self, now: u64, id: FlowId) {
        let Some(f) = self.flows.get_mut(id).and_then(|f| f.as_mut()) else {
            return;
        };
        let dt = now.saturating_sub(f.since) as f64 / 1e9;
        let moved = (f.rate * dt).min(f.remaining.max(0.0));
        f.remaining -= moved;
        if Some(f.up) == self.observed && moved > 0.0 {
            add_to_series(&mut self.series, f.since, now, moved);
        }
        f.since = now;
    }

    fn other(&self, id: FlowId, link: LinkId) -> LinkId {
        match &self.flows[id] {
            Some(f) if f.up == link => f.down,
            Some(f) => f.up,
            None => link,
        }
    }

    fn equal_share(&self, link: LinkId) -> f64 {
        let l = &self.links[link];
        l.cap / l.flows.len().max(1) as f64
    }

    /// Water-fills `link` among its flows, each capped by `cap(flow)`; stores the result as
    /// the flows' share on this link.
    fn water_fill(&mut self, link: LinkId, upload: bool) {
        let mut caps = std::mem::take(&mut self.scratch_caps);
        caps.clear();
        for &id in &self.links[link].flows {
            let cap = if upload {
                self.equal_share(self.other(id, link))
            } else {
                self.flows[id].as_ref().map_or(0.0, |f| f.share_up)
            };
            caps.push((cap, id));
        }
        let cap = self.links[link].cap;
        // Two common cases need no sort. Every flow can take the equal share: each gets it
        // (an upload whose receivers' downloads are wider). Or the caps fit together: each
        // gets its cap (a download fed by narrower uploads). The margin keeps the second case
        // away from the rounding of the sorted fill below, which it then equals exactly.
        let equal = cap / caps.len().max(1) as f64;
        let (min, sum) = caps
            .iter()
            .fold((f64::INFINITY, 0.0), |(m, s), c| (m.min(c.0), s + c.0));
        if min >= equal || sum <= cap * (1.0 - 1e-9) {
            let all_equal = min >= equal;
            for &(c, id) in &caps {
                if let Some(f) = self.flows[id].as_mut() {
                    let give = if all_equal { equal } else { c };
                    if upload {
                        f.share_up = give;
                    } else {
                        f.share_down = give;
                    }
                }
            }
            self.scratch_caps = caps;
            return;
        }
        // Ties broken by flow id: the order of the flows list must not matter.
        caps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut left = cap;
        let mut n = caps.len();
        for &(cap, id) in &caps {
            let fair = left / n as f64;
            let give = cap.min(fair);
            left -= give;
            n -= 1;
            if let Some(f) = self.flows[id].as_mut() {
                if upload {
                    f.share_up = give;
                } else {
                    f.share_down = give;
                }
            }
        }
        self.scratch_caps = caps;
    }

    /// After a flow started or ended on (`up`, `down`): re-water-fills the uploads whose
    /// flows' receivers changed their equal share, then the downloads of every flow on them,
    /// and moves the end of every flow whose rate changed.
    fn recompute(
        &mut self,
        now: u64,
        up: LinkId,
        down: LinkId,
        new: Option<FlowId>,
        out: &mut Vec<Reschedule>,
    ) {
        self.stamp += 1;
        let stamp = self.stamp;
        let mut links = std::mem::take(&mut self.scratch_links);
        links.clear();
        let mark = |links: &mut Vec<LinkId>, all: &mut Vec<Link>, l: LinkId| {
            if all[l].stamp != stamp {
                all[l].stamp = stamp;
                links.push(l);
            }
        };
        // Uploads: `up`, and the senders of every flow into `down`.
        mark(&mut links, &mut self.links, up);
        for j in 0..self.links[down].flows.len() {
            let id = self.links[down].flows[j];
            if let Some(f) = self.flows[id].as_ref() {
                let u = f.up;
                mark(&mut links, &mut self.links, u);
            }
        }
        let uploads = links.len();
        // Downloads: `down`, and the receivers of every flow out of those uploads.
        mark(&mut links, &mut self.links, down);
        for i in 0..uploads {
            let l = links[i];
            for j in 0..self.links[l].flows.len() {
                let id = self.links[l].flows[j];
                if let Some(f) = self.flows[id].as_ref() {
                    let d = f.down;
                    mark(&mut links, &mut self.links, d);
                }
            }
        }
        for (i, &l) in links.iter().enumerate() {
            if i < uploads {
                self.water_fill(l, true);
            }
        }
        for &l in &links[uploads..] {
            self.water_fill(l, false);
        }
        // Every flow whose share may have moved is on one of these downloads, once.
        for &l in &links[uploads..] {
            for j in 0..self.links[l].flows.len() {
                let id = self.links[l].flows[j];
                let Some(f) = self.flows[id].as_ref() else {
                    continue;
                };
                let rate = f.share_up.min(f.share_down);
                let changed = Some(id) == new || (rate - f.rate).abs() > 1e-9 * rate.max(1.0);
                if !changed {
                    continue;
                }
                self.settle(now, id);
                let Some(f) = self.flows[id].as_mut() else {
                    continue;
                };
                self.versions += 1;
                f.rate = rate;
                f.version = self.versions;
                if rate > 0.0 {
                    let secs = f.remaining.max(0.0) / rate;
                    let at = now.saturating_add((secs * 1e9).ceil() as u64);
                    out.push((id, f.version, at));
                }
            }
        }
        self.scratch_links = links;
    }
}

fn add_to_series(series: &mut Vec<f64>, from: u64, to: u64, bytes: f64) {
    let (a, b) = (from as f64 / 1e9, to as f64 / 1e9);
    let last = b.floor() as usize;
    if series.len() <= last {
        series.resize(last + 1, 0.0);
    }
    if b <= a {
        series[last] += bytes;
        return;
    }
    let rate = bytes / (b - a);
    let mut t = a;
    while t < b {
        let sec = t.floor();
        let end = (sec + 1.0).min(b);
        series[sec as usize] += rate * (end - t);
        t = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn one_flow_runs_at_the_narrower_link() {
        let mut net = Net::new();
        let (up, down) = (net.add_link(100.0), net.add_link(50.0));
        let mut out = Vec::new();
        let f = net.start(0, up, down, 100.0, &mut out);
        assert_eq!(out, vec![(f, 1, 2 * S)]);
    }

    #[test]
    fn an_upload_is_shared_and_a_slow_receiver_leaves_room_for_the_other() {
        let mut net = Net::new();
        let up = net.add_link(100.0);
        let (slow, fast) = (net.add_link(10.0), net.add_link(1000.0));
        let mut out = Vec::new();
        let a = net.start(0, up, slow, 100.0, &mut out);
        let b = net.start(0, up, fast, 900.0, &mut out);
        // a is held to 10 by its receiver; b gets the other 90 of the upload.
        let last = |id: FlowId, out: &[Reschedule]| out.iter().rev().find(|r| r.0 == id).copied();
        assert_eq!(last(a, &out).map(|r| r.2), Some(10 * S));
        assert_eq!(last(b, &out).map(|r| r.2), Some(10 * S));
        out.clear();
        // a ends early: b's share grows, and it finishes what is left at 100.
        let moved = net.stop(5 * S, a, &mut out);
        assert!((moved - 50.0).abs() < 1e-6);
        assert_eq!(last(b, &out).map(|r| r.2), Some(5 * S + S * 450 / 100));
        assert!((net.moved(5 * S, b) - 450.0).abs() < 1e-6);
    }

    #[test]
    fn rates_on_a_link_never_exceed_its_capacity() {
        let mut net = Net::new();
        let ups: Vec<LinkId> = (0..5)
            .map(|i| net.add_link(10.0 * (i + 1) as f64))
            .collect();
        let downs: Vec<LinkId> = (0..5).map(|i| net.add_link(7.0 * (i + 1) as f64)).collect();
        let mut out = Vec::new();
        for (i, u) in ups.iter().enumerate() {
            for (j, d) in downs.iter().enumerate() {
                if (i + j) % 2 == 0 {
                    net.start(0, *u, *d, 1e6, &mut out);
                }
            }
        }
        for l in ups.iter().chain(&downs) {
            let sum: f64 = net.links[*l]
                .flows
                .iter()
                .filter_map(|f| net.flows[*f].as_ref())
                .map(|f| f.rate)
                .sum();
            assert!(sum <= net.links[*l].cap * (1.0 + 1e-9), "{sum}");
        }
    }

    #[test]
    fn the_observed_link_counts_bytes_per_second() {
        let mut net = Net::new();
        let (up, down) = (net.add_link(100.0), net.add_link(1000.0));
        net.observe(up);
        let mut out = Vec::new();
        let f = net.start(S / 2, up, down, 250.0, &mut out);
        net.stop(3 * S, f, &mut out);
        let s = net.series();
        assert!(
            (s[0] - 50.0).abs() < 1e-6 && (s[1] - 100.0).abs() < 1e-6,
            "{s:?}"
        );
        assert!((s.iter().sum::<f64>() - 250.0).abs() < 1e-6);
    }
}
