//! OpenTelemetry consistent probability sampling: rejection thresholds and the `ot=th:`
//! entry of the W3C tracestate (OpenTelemetry "TraceState: Probability Sampling").

/// 2^56: the size of the randomness space; a threshold of this value rejects everything.
pub const MAX_THRESHOLD: u64 = 1 << 56;
/// Hex digits in a full-precision threshold (56 bits).
const THRESHOLD_HEX_DIGITS: usize = 14;

/// A rejection threshold T: a trace whose randomness R satisfies R ≥ T is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Threshold(u64);

impl Threshold {
    /// Keeps everything (`th:0`).
    pub const ALWAYS: Threshold = Threshold(0);
    /// Keeps nothing; has no tracestate encoding.
    pub const NEVER: Threshold = Threshold(MAX_THRESHOLD);

    /// T = round((1 − p) · 2^56), computed exactly for the given `f64` probability.
    ///
    /// `p · 2^56` is exact in binary floating point (a power-of-two scaling), so the
    /// rounding happens once, on the exact value, rather than after a lossy `1 − p`.
    pub fn from_probability(p: f64) -> Threshold {
        if p.is_nan() || p <= 0.0 {
            return Threshold::NEVER;
        }
        if p >= 1.0 {
            return Threshold::ALWAYS;
        }
        let scaled = p * MAX_THRESHOLD as f64;
        let whole = scaled.floor();
        let frac = scaled - whole;
        // (1 − p)·2^56 = 2^56 − whole − frac; rounding half up leaves `2^56 − whole` unless
        // frac > ½.
        let t = MAX_THRESHOLD - whole as u64 - u64::from(frac > 0.5);
        Threshold(t)
    }

    /// A threshold from its raw value, clamped to [0, 2^56].
    pub fn from_value(t: u64) -> Threshold {
        Threshold(t.min(MAX_THRESHOLD))
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// The sampling probability this threshold stands for: (2^56 − T) / 2^56.
    pub fn probability(self) -> f64 {
        (MAX_THRESHOLD - self.0) as f64 / MAX_THRESHOLD as f64
    }

    pub fn keeps(self, randomness: u64) -> bool {
        randomness >= self.0
    }

    /// The `th` value: up to 14 hex digits, trailing zeros removed, `0` for T = 0.
    /// `None` for [`Threshold::NEVER`], which the tracestate cannot express.
    pub fn encode(self) -> Option<String> {
        if self.0 >= MAX_THRESHOLD {
            return None;
        }
        if self.0 == 0 {
            return Some("0".to_owned());
        }
        let full = format!("{:014x}", self.0);
        Some(full.trim_end_matches('0').to_owned())
    }

    /// Parses a `th` value (1 to 14 hex digits, implicitly padded with trailing zeros).
    pub fn parse(hex: &[u8]) -> Option<Threshold> {
        if hex.is_empty() || hex.len() > THRESHOLD_HEX_DIGITS {
            return None;
        }
        let mut t: u64 = 0;
        for &c in hex {
            let digit = (c as char).to_digit(16)?;
            if c.is_ascii_uppercase() {
                return None;
            }
            t = (t << 4) | u64::from(digit);
        }
        Some(Threshold(t << (4 * (THRESHOLD_HEX_DIGITS - hex.len()))))
    }
}

/// The explicit randomness value of a tracestate (`ot=…;rv:` with exactly 14 lowercase hex
/// digits), which stands for the trace's randomness R instead of its trace id's bits.
pub fn randomness_value(tracestate: &[u8]) -> Option<u64> {
    let ot = tracestate
        .split(|b| *b == b',')
        .find_map(|m| m.trim_ascii().strip_prefix(b"ot="))?;
    let rv = ot
        .split(|b| *b == b';')
        .find_map(|sub| sub.strip_prefix(b"rv:"))?;
    if rv.len() != THRESHOLD_HEX_DIGITS || rv.iter().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(rv).ok()?, 16).ok()
}

/// Returns `tracestate` with the OpenTelemetry entry's `th` set to `t`, unless it already
/// carries a higher threshold (a head sampler was stricter; lowering it would overstate
/// the trace's weight). A `th` the trace's randomness R contradicts (T > R: the trace
/// would not have been sampled) is erased, as the specification says; R is the entry's
/// `rv`, else `trace_randomness()`. The `ot` entry moves to the front, as W3C asks of an
/// updated entry; its other sub-keys and every other vendor's entry are kept in order.
pub fn with_threshold(
    tracestate: &[u8],
    t: Threshold,
    trace_randomness: impl FnOnce() -> u64,
) -> Vec<u8> {
    let mut existing = None;
    let mut ot_rest: Vec<&[u8]> = Vec::new();
    let mut others: Vec<&[u8]> = Vec::new();
    for member in tracestate.split(|b| *b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        match member.strip_prefix(b"ot=") {
            Some(ot) => {
                for sub in ot.split(|b| *b == b';').filter(|s| !s.is_empty()) {
                    match sub.strip_prefix(b"th:") {
                        Some(th) => existing = Threshold::parse(th),
                        None => ot_rest.push(sub),
                    }
                }
            }
            None => others.push(member),
        }
    }
    if let Some(e) = existing {
        let r = randomness_value(tracestate).unwrap_or_else(trace_randomness);
        if !e.keeps(r) {
            existing = None;
        }
    }
    let effective = existing.map_or(t, |e| e.max(t));
    let mut out = Vec::with_capacity(tracestate.len() + 24);
    match effective.encode() {
        Some(th) => {
            out.extend_from_slice(b"ot=th:");
            out.extend_from_slice(th.as_bytes());
            for sub in &ot_rest {
                out.push(b';');
                out.extend_from_slice(sub);
            }
        }
        None if !ot_rest.is_empty() => {
            out.extend_from_slice(b"ot=");
            out.extend_from_slice(&ot_rest.join(&b';'));
        }
        None => {}
    }
    for member in others {
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(member);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Examples from the OpenTelemetry "TraceState: Probability Sampling" specification.
    #[test]
    fn spec_example_thresholds() {
        let cases = [
            (1.0, "0"),
            (0.5, "8"),
            (0.25, "c"),
            (0.125, "e"),
            (0.1, "e6666666666666"),
            (0.01, "fd70a3d70a3d71"),
            // The f64 nearest 1/3 is slightly below it, so T is slightly above 2/3 · 2^56
            // (exactly what an exact-arithmetic reference computes for that f64).
            (1.0 / 3.0, "aaaaaaaaaaaaac"),
            (2.0 / 3.0, "55555555555558"),
        ];
        for (p, th) in cases {
            assert_eq!(
                Threshold::from_probability(p).encode().as_deref(),
                Some(th),
                "p = {p}"
            );
        }
        assert_eq!(Threshold::from_probability(0.0).encode(), None);
        // The smallest representable probability, 2^-56, is T = 2^56 - 1.
        assert_eq!(
            Threshold::from_probability(1.0 / MAX_THRESHOLD as f64)
                .encode()
                .as_deref(),
            Some("ffffffffffffff")
        );
    }

    #[test]
    fn spec_example_decision_on_w3c_trace_id() {
        // Trace id 4bf92f3577b34da6a3ce929d0e0e4736: R = 0xce929d0e0e4736.
        let r = 0xce929d0e0e4736;
        assert!(Threshold::from_probability(0.25).keeps(r)); // T = 0xc0..., R ≥ T
        assert!(!Threshold::from_probability(0.125).keeps(r)); // T = 0xe0..., R < T
        assert!(Threshold::ALWAYS.keeps(0));
        assert!(!Threshold::NEVER.keeps(MAX_THRESHOLD - 1));
    }

    #[test]
    fn parse_pads_trailing_zeros_and_rejects_bad_values() {
        assert_eq!(Threshold::parse(b"c"), Some(Threshold(0xc0_0000_0000_0000)));
        assert_eq!(Threshold::parse(b"0"), Some(Threshold::ALWAYS));
        assert_eq!(Threshold::parse(b""), None);
        assert_eq!(Threshold::parse(b"C"), None);
        assert_eq!(Threshold::parse(b"fffffffffffffff"), None); // 15 digits
        assert_eq!(Threshold::parse(b"xyz"), None);
    }

    #[test]
    fn encode_parse_round_trip() {
        for p in [0.9, 0.5, 0.123456, 0.001, 1e-9] {
            let t = Threshold::from_probability(p);
            assert_eq!(Threshold::parse(t.encode().unwrap().as_bytes()), Some(t));
        }
    }

    #[test]
    fn tracestate_edits() {
        let c = Threshold::from_probability(0.25);
        let high = || MAX_THRESHOLD - 1;
        assert_eq!(with_threshold(b"", c, high), b"ot=th:c");
        assert_eq!(
            with_threshold(b"vendor=x,ot=rv:fbcdef01234567", c, high),
            b"ot=th:c;rv:fbcdef01234567,vendor=x"
        );
        // A stricter head-sampling threshold is never lowered...
        assert_eq!(
            with_threshold(b"ot=th:e", Threshold::ALWAYS, high),
            b"ot=th:e".to_vec()
        );
        // ...but a more permissive one is raised to ours.
        assert_eq!(with_threshold(b"ot=th:8 , a=b", c, high), b"ot=th:c,a=b");
        assert_eq!(
            with_threshold(b"a=1", Threshold::ALWAYS, high),
            b"ot=th:0,a=1"
        );
        // A threshold R contradicts is erased: by the trace id's bits...
        let low = || 0x10_0000_0000_0000;
        assert_eq!(
            with_threshold(b"ot=th:e", Threshold::ALWAYS, low),
            b"ot=th:0"
        );
        // ...or by the explicit randomness value, which wins over the trace id.
        assert_eq!(
            with_threshold(b"ot=th:e;rv:01000000000000", Threshold::ALWAYS, high),
            b"ot=th:0;rv:01000000000000"
        );
    }

    #[test]
    fn randomness_values_are_read_exactly() {
        assert_eq!(
            randomness_value(b"ot=rv:abcdef01234567"),
            Some(0xabcdef01234567)
        );
        assert_eq!(randomness_value(b"x=1, ot=th:8;rv:00000000000001"), Some(1));
        for bad in [
            &b"ot=rv:abc"[..],
            b"ot=rv:ABCDEF01234567",
            b"ot=rv:abcdef012345678",
            b"rv:abcdef01234567",
            b"ot=th:8",
        ] {
            assert_eq!(
                randomness_value(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
