//! Network namespaces for tests of nodes behind NAT: a "public" bridge, routers that
//! masquerade (nftables), hosts behind them. Everything lives in namespaces this module
//! makes, under names unique to the test run; the host's own interfaces are never touched
//! (even the veth pairs are created inside the namespaces). Dropping the [`Lab`] deletes
//! the namespaces, and with them every interface, bridge and rule in them.

use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};

/// Why namespaces cannot be made here, if they cannot (not root, `ip` or `nft` missing,
/// or the kernel refuses). Checked once per process (tests run in parallel).
pub fn unavailable() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(check).clone()
}

fn check() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces need root)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{tool}` is missing (install iproute2 / nftables)"));
        }
    }
    // One namespace as a trial: containers without CAP_SYS_ADMIN fail here.
    let probe = format!("shoalprobe{}", std::process::id());
    match run("ip", &["netns", "add", &probe]) {
        Ok(_) => {
            let _ = run("ip", &["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!("cannot create a network namespace: {e:#}")),
    }
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A set of namespaces, deleted on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// An empty lab whose namespace names start with `shoal<pid>n<k>` (unique per test run
    /// and per lab in it).
    pub fn new() -> Self {
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            prefix: format!("shoal{}n{k}", std::process::id()),
            namespaces: Vec::new(),
        }
    }

    /// The full name of the namespace called `name` in this lab.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Runs `args` (a command line) inside namespace `name`.
    pub fn exec(&self, name: &str, args: &[&str]) -> anyhow::Result<Output> {
        let ns = self.ns(name);
        let mut full = vec!["netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside namespace `name`.
    pub fn command(&self, name: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name)]).arg(program);
        c
    }

    /// Makes namespace `name`, with its loopback up.
    pub fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        let ns = self.ns(name);
        run("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns);
        self.exec(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A bridge `br0` in namespace `name`, up.
    pub fn add_bridge(&self, name: &str) -> anyhow::Result<()> {
        self.exec(name, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(name, &["ip", "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// A veth pair from namespace `a` (interface `a_if`) to namespace `b` (`b_if`), both up;
    /// `a_if` is enslaved to `a`'s `br0` when `bridge`, else given `a_addr` (CIDR); `b_if`
    /// gets `b_addr`.
    pub fn link(
        &self,
        (a, a_if, a_addr): (&str, &str, Option<&str>),
        (b, b_if, b_addr): (&str, &str, &str),
    ) -> anyhow::Result<()> {
        let b_ns = self.ns(b);
        self.exec(
            a,
            &[
                "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b_ns,
            ],
        )?;
        match a_addr {
            None => self.exec(a, &["ip", "link", "set", a_if, "master", "br0"])?,
            Some(addr) => self.exec(a, &["ip", "addr", "add", addr, "dev", a_if])?,
        };
        self.exec(a, &["ip", "link", "set", a_if, "up"])?;
        self.exec(b, &["ip", "addr", "add", b_addr, "dev", b_if])?;
        self.exec(b, &["ip", "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Turns namespace `name` into a masquerading router: forwards, rewrites the source of
    /// everything leaving by `wan` to its own address there, and lets in from `wan` only
    /// what answers a connection made from inside (no port forwards). With `drop_unsolicited`
    /// anything else from `wan` addressed to the router is dropped silently, as home routers
    /// do: a connection attempt from outside times out. Without, the router's kernel answers
    /// it (a TCP reset: refused at once).
    pub fn masquerade(&self, name: &str, wan: &str, drop_unsolicited: bool) -> anyhow::Result<()> {
        self.exec(name, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        let to_router = if drop_unsolicited {
            format!(
                "\x20 chain to_router {{ type filter hook input priority 0; policy accept;\n\
                 \x20   ct state established,related accept\n\
                 \x20   iifname \"{wan}\" drop\n\
                 \x20 }}\n"
            )
        } else {
            String::new()
        };
        let rules = format!(
            "table ip shoalnat {{\n\
             \x20 chain masq {{ type nat hook postrouting priority 100; oifname \"{wan}\" masquerade; }}\n\
             \x20 chain through {{ type filter hook forward priority 0; policy accept;\n\
             \x20   ct state established,related accept\n\
             \x20   iifname \"{wan}\" drop\n\
             \x20 }}\n\
             {to_router}\
             }}\n"
        );
        let ns = self.ns(name);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("nft stdin")?;
            stdin.write_all(rules.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The default route of namespace `name` goes via `gateway`.
    pub fn default_route(&self, name: &str, gateway: &str) -> anyhow::Result<()> {
        self.exec(name, &["ip", "route", "add", "default", "via", gateway])?;
        Ok(())
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and the other ends of their veth
        // pairs), bridges and nftables rules. Processes still running in it would keep it
        // alive: the test kills them first (they are dropped before the lab).
        for ns in self.namespaces.drain(..).rev() {
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
}
