//! Object metadata rules every kind shares: name validation (DNS subdomain,
//! RFC 1123 and 1035 labels), `generateName`, the fields ObjectMeta knows,
//! and the timestamps the server writes (RFC 3339, UTC) and reads for ages.

use super::selector::valid_value;
use super::status::{FieldError, FieldErrorKind};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which names a kind accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// `example.com`: most kinds.
    Subdomain,
    /// `my-name`, 63 characters: namespaces.
    Label1123,
    /// `my-name`, starting with a letter: services.
    Label1035,
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for \
validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL1123_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for \
validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start \
with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex \
used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn label_ok(s: &str, letter_first: bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && (if letter_first {
            b[0].is_ascii_lowercase()
        } else {
            b[0] != b'-'
        })
        && b[b.len() - 1] != b'-'
}

/// The errors a name gets under a rule, at `field` (`metadata.name`).
pub fn name_errors(rule: NameRule, name: &str, field: &str) -> Vec<FieldError> {
    let v = Value::String(name.into());
    let (max, ok, msg) = match rule {
        NameRule::Subdomain => (
            253,
            name.split('.').all(|l| label_ok(l, false)),
            SUBDOMAIN_MSG,
        ),
        NameRule::Label1123 => (63, label_ok(name, false), LABEL1123_MSG),
        NameRule::Label1035 => (63, label_ok(name, true), LABEL1035_MSG),
    };
    let mut errs = Vec::new();
    if name.len() > max {
        errs.push(FieldError::new(
            field,
            FieldErrorKind::Invalid,
            &v,
            format!("must be no more than {max} characters"),
        ));
    }
    if !ok {
        errs.push(FieldError::new(field, FieldErrorKind::Invalid, &v, msg));
    }
    errs
}

/// The fields of ObjectMeta; anything else in `metadata` is unknown.
const META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Drops the unknown fields of `metadata`, returning their paths.
pub fn prune_metadata(obj: &mut Value) -> Vec<String> {
    let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Vec::new();
    };
    let unknown: Vec<String> = m
        .keys()
        .filter(|k| !META_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in &unknown {
        m.remove(k);
    }
    unknown.iter().map(|k| format!("metadata.{k}")).collect()
}

/// Label keys and values, checked as `ValidateLabels` does.
pub fn label_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(labels) = obj["metadata"]["labels"].as_object() else {
        return errs;
    };
    for (k, v) in labels {
        let name = k.rsplit('/').next().unwrap_or(k);
        if !valid_value(name) || name.is_empty() {
            errs.push(FieldError::new("metadata.labels", FieldErrorKind::Invalid, &Value::String(k.clone()),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
        match v.as_str() {
            Some(s) if valid_value(s) => {}
            _ => errs.push(FieldError::new(&format!("metadata.labels[{k}]"), FieldErrorKind::Invalid, v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")),
        }
    }
    errs
}

/// `generateName` plus five characters from the alphabet the server uses,
/// drawn from `seed` so runs are reproducible.
pub fn generated_name(prefix: &str, seed: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = prefix.chars().take(58).collect::<String>();
    for _ in 0..5 {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        out.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
    }
    out
}

fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// A time as `metav1.Time` writes it: `2026-12-04T01:02:03Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Reads an RFC 3339 time (`Z` or an offset, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, time) = s.split_once(['T', 't'])?;
    let mut dp = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, d) = (dp.next()??, dp.next()??, dp.next()??);
    let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (h, m) = time[i + 1..].split_once(':')?;
        let off = h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60;
        (&time[..i], if &time[i..=i] == "-" { -off } else { off })
    };
    let clock = clock.split('.').next()?;
    let mut cp = clock.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (cp.next()??, cp.next()??, cp.next()??);
    let secs = days_from_civil(y, u32::try_from(mo).ok()?, u32::try_from(d).ok()?) * 86_400
        + h * 3600
        + mi * 60
        + se
        - offset;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// An age as `duration.HumanDuration` writes it (`5s`, `3m20s`, `4h`, `2d3h`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h) = (s / 60, s / 3600);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => {
            if s.is_multiple_of(60) {
                format!("{m}m")
            } else {
                format!("{m}m{}s", s % 60)
            }
        }
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => {
            if m.is_multiple_of(60) {
                format!("{h}h")
            } else {
                format!("{h}h{}m", m % 60)
            }
        }
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 => {
            if h.is_multiple_of(24) {
                format!("{}d", h / 24)
            } else {
                format!("{}d{}h", h / 24, h % 24)
            }
        }
        _ if h < 24 * 365 * 2 => format!("{}d", h / 24),
        _ if h < 24 * 365 * 8 => {
            let dy = h / 24 % 365;
            if dy == 0 {
                format!("{}y", h / 24 / 365)
            } else {
                format!("{}y{dy}d", h / 24 / 365)
            }
        }
        _ => format!("{}y", h / 24 / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_rule() {
        assert!(
            name_errors(
                NameRule::Subdomain,
                "canaryreleases.kanari.dev",
                "metadata.name"
            )
            .is_empty()
        );
        assert!(name_errors(NameRule::Label1035, "web-stable", "metadata.name").is_empty());
        assert_eq!(
            name_errors(NameRule::Label1035, "1web", "metadata.name").len(),
            1
        );
        assert_eq!(
            name_errors(NameRule::Label1123, "a.b", "metadata.name").len(),
            1
        );
        let e = name_errors(NameRule::Subdomain, "Web", "metadata.name");
        assert!(
            e[0].to_string().starts_with(
                "metadata.name: Invalid value: \"Web\": a lowercase RFC 1123 subdomain"
            )
        );
        assert_eq!(
            name_errors(NameRule::Label1123, &"a".repeat(64), "metadata.name").len(),
            1
        );
    }

    #[test]
    fn timestamps_round_trip_and_ages_read_like_kubectl() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_346_123);
        assert_eq!(rfc3339(t), "2026-12-04T01:02:03Z");
        assert_eq!(parse_rfc3339("2026-12-04T01:02:03.123456Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-12-04T02:02:03+01:00"), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
        let ages: Vec<String> = [5, 130, 600, 3 * 3600 + 60, 50 * 3600]
            .iter()
            .map(|s| human_duration(Duration::from_secs(*s)))
            .collect();
        assert_eq!(ages, ["5s", "2m10s", "10m", "3h1m", "2d2h"]);
    }

    #[test]
    fn generated_names_are_prefix_plus_five_and_vary_with_the_seed() {
        let (a, b) = (generated_name("web-", 1), generated_name("web-", 2));
        assert_eq!((a.len(), a.starts_with("web-")), (9, true));
        assert_ne!(a, b);
    }
}
