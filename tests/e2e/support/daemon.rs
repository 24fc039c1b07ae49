//! The real `llmtail` binary on ephemeral ports, started as [`Launch`] says, and the
//! memory cgroups it can run in.

use super::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The real daemon, started from a config written for the test.
pub struct Daemon {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llmtail"))
}

impl Daemon {
    /// Starts llmtail with `body` (YAML for every section but receiver and admin, which get
    /// ephemeral ports) and waits until `/readyz` answers 200.
    pub fn start(body: &str) -> Daemon {
        Daemon::start_with("", body)
    }

    /// Like [`Daemon::start`], with environment variables for `${env:…}` in the config.
    pub fn start_env(body: &str, envs: &[(&str, &str)]) -> Daemon {
        Daemon::launch("", body, envs)
    }

    /// Like [`Daemon::start`], with extra keys for `receiver.http` (indented 4 spaces).
    pub fn start_with(http_extra: &str, body: &str) -> Daemon {
        Daemon::launch(http_extra, body, &[])
    }

    /// Extra receiver keys: `grpc_extra` and `http_extra` are lines under `receiver.grpc`
    /// and `receiver.http` (4-space indent); `http_extra` may end with receiver-level keys
    /// (2-space indent), e.g. `auth`.
    pub fn start_receivers(grpc_extra: &str, http_extra: &str, body: &str) -> Daemon {
        Daemon::launch_with(grpc_extra, http_extra, body, &[])
    }

    fn launch(http_extra: &str, body: &str, envs: &[(&str, &str)]) -> Daemon {
        Daemon::launch_with("", http_extra, body, envs)
    }

    /// A daemon whose gRPC receiver listens on `grpc_port` (for peers that must know it).
    pub fn start_at(grpc_port: u16, body: &str) -> Daemon {
        Daemon::launch_with(&format!("@{grpc_port}"), "", body, &[])
    }

    /// Like `start_at`, with extra receiver keys as in `start_receivers`.
    pub fn start_at_with(grpc_port: u16, grpc_extra: &str, http_extra: &str, body: &str) -> Daemon {
        Daemon::launch_with(
            &format!("@{grpc_port}\n{grpc_extra}"),
            http_extra,
            body,
            &[],
        )
    }

    /// The receiver and admin part of every test config; a `grpc_extra` of `@PORT` fixes
    /// the gRPC port.
    fn prefix(grpc_extra: &str, http_extra: &str) -> String {
        Daemon::prefix_limited(grpc_extra, http_extra, 1_000_000)
    }

    fn prefix_limited(grpc_extra: &str, http_extra: &str, max_request_bytes: usize) -> String {
        let (port, grpc_extra) = match grpc_extra.strip_prefix('@') {
            Some(rest) => rest.split_once('\n').unwrap_or((rest, "")),
            None => ("0", grpc_extra),
        };
        format!(
            "receiver:\n  grpc:\n    endpoint: 127.0.0.1:{port}\n    max_request_bytes: {max_request_bytes}\n{grpc_extra}  http:\n    endpoint: 127.0.0.1:0\n    max_request_bytes: {max_request_bytes}\n{http_extra}admin:\n  endpoint: 127.0.0.1:0\n"
        )
    }

    /// Starts llmtail as [`Launch`] says.
    pub fn launch_opts(body: &str, opts: Launch<'_>) -> Daemon {
        let mut prefix = Daemon::prefix_limited(
            opts.grpc_extra,
            opts.http_extra,
            opts.max_request_bytes.unwrap_or(1_000_000),
        );
        if let Some(endpoint) = opts.grpc_endpoint {
            prefix = prefix.replacen("127.0.0.1:0", endpoint, 1);
        }
        let config = format!("{prefix}{body}");
        Daemon::spawn_in(config, opts.envs, opts.cgroup, opts.dir, opts.hosts)
    }

    /// Rewrites the config file of a daemon started with [`Daemon::start_at`] with a new
    /// `body` (receivers as at start) and sends SIGHUP.
    pub fn reload_at(&self, grpc_port: u16, body: &str) {
        let path = self.dir.path().join("config.yaml");
        let prefix = Daemon::prefix(&format!("@{grpc_port}"), "");
        std::fs::write(&path, format!("{prefix}{body}")).unwrap();
        self.signal("HUP");
    }

    /// Rewrites the config file with a new `body` (receivers as at start) and sends SIGHUP.
    pub fn reload(&self, body: &str) {
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, format!("{}{body}", Daemon::prefix("", ""))).unwrap();
        self.signal("HUP");
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn launch_with(
        grpc_extra: &str,
        http_extra: &str,
        body: &str,
        envs: &[(&str, &str)],
    ) -> Daemon {
        // Port 0 everywhere: the daemon logs the addresses it bound, so tests never race
        // each other for ports.
        let config = format!("{}{body}", Daemon::prefix(grpc_extra, http_extra));
        Daemon::spawn(config, envs, None, None)
    }

    fn spawn(
        config: String,
        envs: &[(&str, &str)],
        cgroup: Option<&MemoryCgroup>,
        dir: Option<tempfile::TempDir>,
    ) -> Daemon {
        Daemon::spawn_in(config, envs, cgroup, dir, None)
    }

    fn spawn_in(
        config: String,
        envs: &[(&str, &str)],
        cgroup: Option<&MemoryCgroup>,
        dir: Option<tempfile::TempDir>,
        hosts: Option<&std::path::Path>,
    ) -> Daemon {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let log_path = dir.path().join("llmtail.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = match (cgroup, hosts) {
            // unshare becomes the shell, which binds the hosts file over /etc/hosts in its
            // own mount namespace, then becomes llmtail (one pid throughout, for signals).
            (None, Some(hosts)) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(hosts)
                    .arg(binary());
                c
            }
            (Some(_), Some(_)) => panic!("a cgroup and a hosts file together are not supported"),
            // The shell moves itself into the group, then becomes llmtail.
            (Some(group), None) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(group.procs())
                    .arg(binary());
                c
            }
            (None, None) => Command::new(binary()),
        };
        let mut child = command
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("llmtail starts");
        let end = Instant::now() + Duration::from_secs(20);
        let addr_after = |line: &str, key: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(key)? + key.len()..];
            let token = rest.split([' ', '/']).next()?;
            token.parse().ok()
        };
        let (grpc, http, admin) = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("llmtail is ready")) {
                break (
                    addr_after(line, "grpc=").expect("grpc address in the ready line"),
                    addr_after(line, "http=").expect("http address in the ready line"),
                    addr_after(line, "admin=").expect("admin address in the ready line"),
                );
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("llmtail exited with {status}: {text}");
            }
            assert!(Instant::now() < end, "llmtail not ready: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(http_get(admin, "/readyz").map(|r| r.0), Some(200));
        Daemon {
            grpc,
            http,
            admin,
            child,
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The most resident memory the process has had (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The process's anonymous resident memory now (`RssAnon`: its heap and stacks, not
    /// the trace log's mapped pages, which are page cache), in bytes.
    pub fn anon_rss(&self) -> u64 {
        self.status_bytes("RssAnon:")
    }

    /// A `kB` field of `/proc/<pid>/status`, in bytes (0 once the process is gone).
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("llmtail.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> Metrics {
        let (code, body) = http_get(self.admin, "/metrics").expect("metrics answer");
        assert_eq!(code, 200);
        Metrics::parse(&body)
    }

    /// Polls the metrics until `pred` holds.
    pub async fn wait_metrics(
        &self,
        timeout: Duration,
        pred: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let end = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if pred(&m) || Instant::now() > end {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "llmtail did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How [`Daemon::launch_opts`] starts the daemon.
#[derive(Default)]
pub struct Launch<'a> {
    /// `receiver.*.max_request_bytes` (1,000,000 unless given).
    pub max_request_bytes: Option<usize>,
    pub envs: &'a [(&'a str, &'a str)],
    /// Run inside this memory-limited cgroup.
    pub cgroup: Option<&'a MemoryCgroup>,
    /// The working directory (e.g. one a durable queue outlives restarts in).
    pub dir: Option<tempfile::TempDir>,
    /// Extra keys under `receiver.grpc` and `receiver.http` (4-space indent).
    pub grpc_extra: &'a str,
    pub http_extra: &'a str,
    /// The gRPC receiver's `host:port` (`127.0.0.1:0` unless given).
    pub grpc_endpoint: Option<&'a str>,
    /// Run in a private mount namespace in which this file is `/etc/hosts` (names the test
    /// resolves as it likes; rewritten in place, the daemon sees every change). Needs root.
    pub hosts: Option<&'a std::path::Path>,
}

/// A memory-limited cgroup (v1 or v2, whichever the machine mounts), as a pod's limit is;
/// removed when dropped. Needs root, as CI has.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn create(name: &str, limit: u64) -> MemoryCgroup {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let base = if v2 {
            // Enable the memory controller for the root's children (harmless if on).
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/memory")
        };
        let dir = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} (the test needs root and a memory cgroup): {e}",
                dir.display()
            )
        });
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        if !v2 {
            // No swap: the limit is the limit.
            let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        }
        MemoryCgroup { dir, v2 }
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Most memory the group used (v1 `max_usage_in_bytes`, v2 `memory.peak`).
    pub fn peak_bytes(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(0)
    }

    /// Processes of the group killed by the OOM killer.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}
