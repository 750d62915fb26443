//! Policy tests of holder ranking by location (label, observed prefix, estimated RTT, then
//! load) and of the region budget, in virtual time (`t0` plus offsets; no clock is read by
//! the policy).

use super::*;
use libp2p::identity::Keypair;

fn peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

fn file() -> FileId {
    FileId([1; 32])
}

fn ip(a: &str) -> Multiaddr {
    format!("/ip4/{a}/tcp/4002").parse().unwrap()
}

fn all(blocks: u32) -> Vec<BlockRange> {
    vec![BlockRange::new(0, blocks)]
}

fn policy(blocks: u32, region_budget: bool) -> Policy {
    let mut p = Policy::new(PolicyConfig {
        max_master_piece: 4,
        lone_master_piece: 4,
        min_master_piece: 1,
        max_master_pieces: 1,
        master_load_half: 1000,
        max_peer_piece: 8,
        max_blocks_per_answer: 16,
        region_budget,
        ..super::tests::sequential()
    });
    p.add_file(
        file(),
        "f".into(),
        u64::from(blocks) * 1024,
        Blocks::full(blocks),
    );
    p
}

/// A connected peer at `addr` (its observed address too), with `region` as its label.
fn join(p: &mut Policy, addr: &str, region: &str) -> PeerId {
    let x = peer();
    p.peer_up(x, vec![ip(addr)]);
    p.observe_addr(x, &ip(addr));
    p.set_region(x, region.into());
    x
}

/// Whom `me` is sent to first for `file`.
fn first_source(p: &mut Policy, now: Instant, me: PeerId, blocks: u32) -> Source {
    let ans = p.locate(now, me, &file(), &all(blocks)).unwrap();
    ans.assignments
        .first()
        .map(|a| a.source.clone())
        .unwrap_or_else(|| panic!("nothing assigned: {ans:?}"))
}

fn is_peer(src: &Source, want: PeerId) -> bool {
    matches!(src, Source::Peer { peer, .. } if *peer == want)
}

/// Feeds the policy `rounds` of measurements in virtual time: the master pings everyone,
/// and every peer reports its RTT to every other (`rtt(a, b)` in ms), 2 s apart (the report
/// rate limit). Returns the virtual time after the last round.
fn measure(
    p: &mut Policy,
    t0: Instant,
    peers: &[PeerId],
    to_master_ms: impl Fn(usize) -> u64,
    rtt_ms: impl Fn(usize, usize) -> u64,
    rounds: u32,
) -> Instant {
    let mut now = t0;
    for _ in 0..rounds {
        for (i, a) in peers.iter().enumerate() {
            p.master_rtt(*a, Duration::from_millis(to_master_ms(i)));
            let samples: Vec<RttSample> = peers
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, b)| RttSample {
                    peer: *b,
                    rtt_us: (rtt_ms(i, j) * 1000) as u32,
                })
                .collect();
            p.rtt_report(now, *a, &samples).unwrap();
        }
        now += crate::location::MIN_REPORT_INTERVAL;
    }
    now
}

#[test]
fn the_region_label_comes_first_then_the_prefix() {
    let mut p = policy(8, false);
    let me = join(&mut p, "10.0.1.5", "eu");
    let labelled = join(&mut p, "10.9.9.9", "eu");
    let neighbour = join(&mut p, "10.0.1.77", "us");
    let stranger = join(&mut p, "10.7.7.7", "us");
    for h in [stranger, neighbour, labelled] {
        p.have(&file(), h, &all(8));
    }
    let now = Instant::now();
    assert!(is_peer(&first_source(&mut p, now, me, 8), labelled));
    // Without the labelled holder, the one on the same /24 wins over the stranger (which is
    // less loaded: it has nothing assigned, the neighbour now has a piece).
    p.peer_down(&labelled);
    let other = join(&mut p, "10.0.1.200", "");
    p.locate(now, other, &file(), &all(8)).unwrap();
    assert!(p.load(&neighbour) > 0, "the neighbour is loaded");
    assert!(is_peer(&first_source(&mut p, now, me, 8), neighbour));
    // An IPv6 requester: the same /48 counts, another /48 does not.
    let v6 = |a: &str| -> Multiaddr { format!("/ip6/{a}/tcp/1").parse().unwrap() };
    let mut q = policy(8, false);
    let me6 = peer();
    q.peer_up(me6, vec![v6("2001:db8:5:1::1")]);
    q.observe_addr(me6, &v6("2001:db8:5:1::1"));
    let (near6, far6) = (peer(), peer());
    for (x, a) in [(near6, "2001:db8:5:ffff::9"), (far6, "2001:db8:6::1")] {
        q.peer_up(x, vec![v6(a)]);
        q.observe_addr(x, &v6(a));
    }
    q.have(&file(), far6, &all(8));
    q.have(&file(), near6, &all(8));
    q.locate(now, peer(), &file(), &all(8)).unwrap();
    assert!(is_peer(&first_source(&mut q, now, me6, 8), near6));
}

#[test]
fn then_the_lowest_estimated_rtt_then_unknown() {
    // Three sites on different prefixes, no labels: me and `near` 5 ms apart, `far` 80 ms
    // from both; the master 40 ms from me and near, 60 ms from far. The holders never
    // measured each other from me's side directly... they did, but the estimate is what
    // ranks: coordinates from reports and the master's pings.
    let mut p = policy(8, false);
    let me = join(&mut p, "10.1.0.1", "");
    let near = join(&mut p, "10.2.0.1", "");
    let far = join(&mut p, "10.3.0.1", "");
    let unknown = join(&mut p, "10.4.0.1", "");
    let peers = [me, near, far];
    let site = [0, 0, 1];
    let t0 = Instant::now();
    let now = measure(
        &mut p,
        t0,
        &peers,
        |i| [40, 40, 60][i],
        |i, j| if site[i] == site[j] { 5 } else { 80 },
        100,
    );
    let est = |a, b| p.estimated_rtt(&a, &b).unwrap().as_secs_f64() * 1e3;
    let (to_near, to_far) = (est(me, near), est(me, far));
    assert!(
        (to_near - 5.0).abs() < 2.5,
        "me-near estimated {to_near:.1} ms, is 5"
    );
    assert!(
        (to_far - 80.0).abs() < 16.0,
        "me-far estimated {to_far:.1} ms, is 80"
    );
    for h in [unknown, far, near] {
        p.have(&file(), h, &all(8));
    }
    assert!(is_peer(&first_source(&mut p, now, me, 8), near));
    p.peer_down(&near);
    // A measured holder before one nothing is known of.
    assert!(is_peer(&first_source(&mut p, now, me, 8), far));
    p.peer_down(&far);
    assert!(is_peer(&first_source(&mut p, now, me, 8), unknown));
}

#[test]
fn within_a_tier_the_least_loaded() {
    let mut p = policy(8, false);
    let me = join(&mut p, "10.0.0.1", "eu");
    let (a, b) = (
        join(&mut p, "10.5.0.1", "eu"),
        join(&mut p, "10.6.0.1", "eu"),
    );
    let far = join(&mut p, "10.7.0.1", "us");
    for h in [a, b, far] {
        p.have(&file(), h, &all(8));
    }
    let now = Instant::now();
    // Two other requesters take a piece each: both in-region holders get one.
    let (r1, r2, r3) = (
        join(&mut p, "10.8.0.1", "eu"),
        join(&mut p, "10.8.0.2", "eu"),
        join(&mut p, "10.8.0.3", "eu"),
    );
    let first = first_source(&mut p, now, r1, 8);
    let second = first_source(&mut p, now, r2, 8);
    assert!(is_peer(&first, a) || is_peer(&first, b));
    assert!(is_peer(&second, a) || is_peer(&second, b));
    assert_ne!(
        first, second,
        "the second requester goes to the less loaded one"
    );
    // One more load on `a`: `b` is chosen; the unloaded holder in the other region is not.
    p.locate(now, r3, &file(), &[BlockRange::new(0, 1)])
        .unwrap();
    let lighter = if p.load(&a) < p.load(&b) { a } else { b };
    assert_ne!(p.load(&a), p.load(&b));
    assert!(is_peer(&first_source(&mut p, now, me, 8), lighter));
    assert_eq!(p.load(&far), 0);
}

#[test]
fn the_ranking_holds_for_widely_held_blocks_too() {
    // Over 128 holders: the load-index walk. Nobody shares my label; one holder shares my
    // prefix, and it is the most loaded.
    let mut p = policy(1, false);
    let me = join(&mut p, "10.0.0.1", "eu");
    let now = Instant::now();
    let mut holders = Vec::new();
    for i in 0..200u32 {
        let h = join(
            &mut p,
            &format!("10.{}.{}.1", 1 + i / 200, i % 200 + 10),
            "us",
        );
        p.have(&file(), h, &all(1));
        holders.push(h);
    }
    let neighbour = join(&mut p, "10.0.0.99", "us");
    p.have(&file(), neighbour, &all(1));
    let other = join(&mut p, "10.0.0.98", "");
    p.locate(now, other, &file(), &all(1)).unwrap();
    assert_eq!(p.load(&neighbour), 1);
    assert!(is_peer(&first_source(&mut p, now, me, 1), neighbour));
    // A holder in my region comes before the one on my prefix.
    let mate = join(&mut p, "10.200.0.1", "eu");
    p.have(&file(), mate, &all(1));
    assert!(is_peer(&first_source(&mut p, now, me, 1), mate));
}

#[test]
fn a_region_budget_lets_one_copy_in_and_keeps_the_rest_inside() {
    let mut p = policy(8, true);
    let us = join(&mut p, "10.1.0.1", "us");
    p.have(&file(), us, &all(8));
    let (e1, e2) = (
        join(&mut p, "10.2.0.1", "eu"),
        join(&mut p, "10.2.0.2", "eu"),
    );
    let t0 = Instant::now();
    // The first European requester gets the region's copy from the master, which pays for
    // it, rather than across regions.
    assert_eq!(first_source(&mut p, t0, e1, 8), Source::Master);
    // The second waits for it rather than crossing (nor does the master send it again).
    let ans = p.locate(t0, e2, &file(), &all(8)).unwrap();
    assert!(ans.assignments.is_empty(), "{:?}", ans.assignments);
    assert!(ans.retry_after > Duration::ZERO);
    // The copy arrived: the second is sent to it, inside the region.
    p.have(&file(), e1, &all(8));
    assert!(is_peer(&first_source(&mut p, t0, e2, 8), e1));
    // Without the budget (one entry per region, the default): the first crosses, as the
    // master sends no second copy, and the second waits for it to land.
    let mut q = policy(8, false);
    let us = join(&mut q, "10.1.0.1", "us");
    q.have(&file(), us, &all(8));
    let (e1, e2) = (
        join(&mut q, "10.2.0.1", "eu"),
        join(&mut q, "10.2.0.2", "eu"),
    );
    assert!(is_peer(&first_source(&mut q, t0, e1, 8), us));
    let ans = q.locate(t0, e2, &file(), &all(8)).unwrap();
    assert!(ans.assignments.is_empty(), "{:?}", ans.assignments);
    q.have(&file(), e1, &all(8));
    assert!(is_peer(&first_source(&mut q, t0, e2, 8), e1));
    // With neither, the second crosses at once.
    let mut r = policy(8, false);
    r.cfg.one_entry_per_region = false;
    let us = join(&mut r, "10.1.0.1", "us");
    r.have(&file(), us, &all(8));
    let (e1, e2) = (
        join(&mut r, "10.2.0.1", "eu"),
        join(&mut r, "10.2.0.2", "eu"),
    );
    assert!(is_peer(&first_source(&mut r, t0, e1, 8), us));
    assert!(is_peer(&first_source(&mut r, t0, e2, 8), us));
}

#[test]
fn under_a_region_budget_the_master_sends_each_block_once_per_region() {
    let mut p = policy(8, true);
    let t0 = Instant::now();
    let eu: Vec<PeerId> = (0..3)
        .map(|i| join(&mut p, &format!("10.2.0.{i}"), "eu"))
        .collect();
    let us: Vec<PeerId> = (0..3)
        .map(|i| join(&mut p, &format!("10.1.0.{i}"), "us"))
        .collect();
    // Per region, per block: how many copies the master handed out.
    let mut sent: HashMap<(&str, u32), u32> = HashMap::default();
    // Six peers want 8 blocks: each gets its share of first copies (two) per answer, and
    // asks again until nothing is left to hand out.
    // (Like a node, each asks only for what is not on its way to it already.)
    let mut mine: HashMap<PeerId, Vec<u32>> = HashMap::default();
    for _round in 0..3 {
        for (region, group) in [("eu", &eu), ("us", &us)] {
            for x in group.iter() {
                let got = mine.entry(*x).or_default();
                let need: Vec<BlockRange> = (0..8)
                    .filter(|b| !got.contains(b))
                    .map(|b| BlockRange::new(b, b + 1))
                    .collect();
                for a in p.locate(t0, *x, &file(), &need).unwrap().assignments {
                    assert_eq!(a.source, Source::Master, "nobody holds anything yet");
                    for b in a.range.iter() {
                        got.push(b);
                        *sent.entry((region, b)).or_default() += 1;
                    }
                }
            }
        }
    }
    // Each region got every block once; without the budget the us requesters would have
    // had to wait for eu's copies.
    assert!(sent.values().all(|n| *n == 1), "{sent:?}");
    assert_eq!(sent.len(), 16, "{sent:?}");
    // A copy that never arrives (its assignment expired) may be sent again, once.
    let later = t0 + PolicyConfig::default().assignment_timeout;
    let ans = p.locate(later, eu[2], &file(), &all(8)).unwrap();
    assert_eq!(ans.assignments[0].source, Source::Master);
    assert_eq!(ans.assignments[0].range, BlockRange::new(0, 2));
    // The requester bringing a copy in leaves: another one may bring it.
    p.peer_down(&eu[2]);
    let ans = p.locate(later, eu[0], &file(), &all(8)).unwrap();
    assert_eq!(ans.assignments[0].range, BlockRange::new(0, 2));
}

#[test]
fn without_a_label_nothing_is_budgeted() {
    let mut p = policy(8, true);
    let (a, b) = (join(&mut p, "10.2.0.1", ""), join(&mut p, "10.2.0.2", ""));
    let now = Instant::now();
    let first = p.locate(now, a, &file(), &all(8)).unwrap();
    let second = p.locate(now, b, &file(), &all(8)).unwrap();
    // One first copy at a time swarm-wide, as without the budget.
    assert_eq!(first.assignments[0].range, BlockRange::new(0, 4));
    assert_eq!(second.assignments[0].range, BlockRange::new(4, 8));
}

#[test]
fn location_state_leaves_with_the_peer() {
    let mut p = policy(8, false);
    let (a, b) = (
        join(&mut p, "10.2.0.1", "eu"),
        join(&mut p, "10.2.0.2", "eu"),
    );
    let t0 = Instant::now();
    measure(&mut p, t0, &[a, b], |_| 10, |_, _| 3, 3);
    assert!(p.estimated_rtt(&a, &b).is_some());
    // A report about a peer the master does not see is taken as nothing.
    let stranger = peer();
    let later = t0 + Duration::from_secs(60);
    let s = [RttSample {
        peer: stranger,
        rtt_us: 1_000,
    }];
    assert_eq!(p.rtt_report(later, a, &s), Ok(0));
    p.peer_down(&a);
    p.peer_down(&b);
    assert!(p.locations.is_empty(), "{:?}", p.locations);
    // Nor does a peer the master does not see get any state from its report.
    assert_eq!(p.rtt_report(later, stranger, &s), Ok(0));
    assert!(p.locations.is_empty());
}
