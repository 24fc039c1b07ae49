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

/// The members in force, sorted by address; `me` indexes this replica (none while it
/// leaves: every trace then has another owner).
#[derive(Debug, Clone)]
pub struct Ring {
    pub(super) members: Vec<Member>,
    me: Option<usize>,
}

impl Ring {
    /// The ring of `addrs` as seen by `me` (added if missing).
    pub fn new(mut addrs: Vec<String>, me: &str) -> Ring {
        if !addrs.iter().any(|a| a == me) {
            addrs.push(me.to_owned());
        }
        Ring::of(addrs, me)
    }

    /// The ring of `addrs` without adding `me`: a replica that is leaving owns nothing.
    pub fn without_me(addrs: Vec<String>, me: &str) -> Ring {
        Ring::of(addrs.into_iter().filter(|a| a != me).collect(), me)
    }

    fn of(mut addrs: Vec<String>, me: &str) -> Ring {
        addrs.sort();
        addrs.dedup();
        let members: Vec<Member> = addrs
            .into_iter()
            .map(|a| Member {
                hash: fnv(a.as_bytes()),
                addr: Arc::from(a),
            })
            .collect();
        let me = members.iter().position(|m| &*m.addr == me);
        Ring { members, me }
    }

    /// This replica's address, when it is a member.
    pub fn me_addr(&self) -> Option<&str> {
        self.me.map(|i| &*self.members[i].addr)
    }

    /// The member with address `addr`.
    pub fn member(&self, addr: &str) -> Option<&Arc<str>> {
        self.members
            .iter()
            .find(|m| &*m.addr == addr)
            .map(|m| &m.addr)
    }

    /// Whether `addr` is a member.
    pub fn contains(&self, addr: &str) -> bool {
        self.members.iter().any(|m| &*m.addr == addr)
    }

    /// The members' addresses.
    pub fn addrs(&self) -> impl Iterator<Item = &Arc<str>> {
        self.members.iter().map(|m| &m.addr)
    }

    /// Whether both rings have the same members.
    pub fn same_members(&self, other: &Ring) -> bool {
        self.members.len() == other.members.len()
            && self
                .members
                .iter()
                .zip(&other.members)
                .all(|(a, b)| a.addr == b.addr)
    }

    /// The member that owns `trace` (rendezvous hashing); 0 in an empty ring.
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
        self.members.get(self.owner(trace)).map_or("", |m| &m.addr)
    }

    /// The member that owns `trace` (`None` in an empty ring).
    pub fn owner_member(&self, trace: &TraceId) -> Option<&Arc<str>> {
        self.members.get(self.owner(trace)).map(|m| &m.addr)
    }

    /// The owner's address when it is another replica (`None` when it is this one, or
    /// when there is no member at all).
    pub fn elsewhere(&self, trace: &TraceId) -> Option<&Arc<str>> {
        if self.members.is_empty() {
            return None;
        }
        let owner = self.owner(trace);
        (Some(owner) != self.me).then(|| &self.members[owner].addr)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}
