//! `${env:NAME}` and `${env:NAME:-default}` substitution in the config text.

use super::Problem;

/// Replaces `${env:NAME}` and `${env:NAME:-default}`; `$${` stays a literal `${`.
/// Returns the new text and a problem for every variable that is unset with no default.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> (String, Vec<Problem>) {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            if rest[..i].ends_with('$') {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[i..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            match inner.strip_prefix("env:") {
                Some(spec) => {
                    let (name, default) = match spec.split_once(":-") {
                        Some((n, d)) => (n, Some(d)),
                        None => (spec, None),
                    };
                    match (lookup(name), default) {
                        (Some(v), _) => out.push_str(&v),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => problems.push(Problem {
                            path: format!("${{env:{name}}}"),
                            line: Some(line_no + 1),
                            message: format!(
                                "environment variable {name} is not set; set it or write ${{env:{name}:-default}}"
                            ),
                        }),
                    }
                }
                None => problems.push(Problem {
                    path: format!("${{{inner}}}"),
                    line: Some(line_no + 1),
                    message: "only ${env:NAME} and ${env:NAME:-default} are substituted; write $${ for a literal ${".into(),
                }),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    (out, problems)
}
