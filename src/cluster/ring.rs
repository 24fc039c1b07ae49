//! The ring: which replica owns a trace (rendezvous hashing over the members), the same on
//! every replica that knows the same members.

use std::sync::Arc;

use crate::otlp::TraceId;

/// A member address in the form resolved addresses take (`SocketAddr` display): an IPv6
/// host written without brackets (`fd00::7:4317`, as `${env:POD_IP}:4317` gives) gets them.
pub fn normalize(addr: &str) -> String {
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return a.to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && !host.starts_with('[') => {
            match format!("[{host}]:{port}").parse::<std::net::SocketAddr>() {
                Ok(a) => a.to_string(),
                Err(_) => addr.to_owned(),
            }
        }
        _ => addr.to_owned(),
    }
}

/// A stable 64-bit hash (FNV-1a): every replica must compute the same ring.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: a well-mixed score from member and trace hashes.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) addr: Arc<str>,
    hash: u64,
}

/// The members in force, sorted by address; `me` indexes this replica.
#[derive(Debug)]
pub struct Ring {
    pub(super) members: Vec<Member>,
    me: usize,
}

impl Ring {
    /// The ring of `addrs` as seen by `me` (added if missing).
    pub fn new(mut addrs: Vec<String>, me: &str) -> Ring {
        if !addrs.iter().any(|a| a == me) {
            addrs.push(me.to_owned());
        }
        addrs.sort();
        addrs.dedup();
        let members: Vec<Member> = addrs
            .into_iter()
            .map(|a| Member {
                hash: fnv(a.as_bytes()),
                addr: Arc::from(a),
            })
            .collect();
        let me = members
            .iter()
            .position(|m| &*m.addr == me)
            .expect("self is a member");
        Ring { members, me }
    }

    /// The member that owns `trace` (rendezvous hashing).
    pub fn owner(&self, trace: &TraceId) -> usize {
        let key = u64::from_le_bytes(trace.0[..8].try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(trace.0[8..].try_into().expect("8 bytes"));
        let mut best = (0, 0u64);
        for (i, m) in self.members.iter().enumerate() {
            let score = mix(key ^ m.hash);
            if i == 0 || score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }

    /// The address of the member that owns `trace`.
    pub fn owner_addr(&self, trace: &TraceId) -> &str {
        &self.members[self.owner(trace)].addr
    }

    /// The owner's address when it is another replica.
    pub fn elsewhere(&self, trace: &TraceId) -> Option<&Arc<str>> {
        let owner = self.owner(trace);
        (owner != self.me).then(|| &self.members[owner].addr)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}
