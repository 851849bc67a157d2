//! A strict parser of the Prometheus text exposition format (version
//! 0.0.4), for tests of chaperone's `/metrics`: every line must be a
//! well-formed `# HELP`, `# TYPE`, comment or sample; every sample must
//! belong to a family declared by `# TYPE` before it; label values must be
//! properly escaped; values must be floats; histograms must have
//! cumulative buckets ending in `le="+Inf"` equal to `_count`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The sum of the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .ok()
            .filter(|_| !s.starts_with('+') && !s.eq_ignore_ascii_case("inf"))
            .with_context(|| format!("{s:?} is not a float")),
    }
}

/// The family a sample belongs to, given the declared types.
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_total", "_created", "_bucket", "_count", "_sum", "_info"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.contains_key(base)
        {
            return Some(base);
        }
    }
    None
}

/// Parses `text`, failing on the first line that is not valid.
pub fn parse(text: &str) -> Result<Exposition> {
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let mut words = rest.splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().with_context(at)?;
                    let kind = words.next().with_context(at)?;
                    ensure!(is_name(name), "{}: bad metric name", at());
                    ensure!(
                        matches!(
                            kind,
                            "counter"
                                | "gauge"
                                | "histogram"
                                | "summary"
                                | "untyped"
                                | "info"
                                | "stateset"
                                | "gaugehistogram"
                                | "unknown"
                        ),
                        "{}: unknown type",
                        at()
                    );
                    ensure!(
                        out.types.insert(name.into(), kind.into()).is_none(),
                        "{}: TYPE declared twice",
                        at()
                    );
                }
                Some("HELP") => {
                    let name = words.next().with_context(at)?;
                    ensure!(is_name(name), "{}: bad metric name", at());
                }
                _ => {} // a comment (or `# EOF`)
            }
            continue;
        }
        let sample = parse_sample(line).with_context(at)?;
        ensure!(
            family(&sample.name, &out.types).is_some(),
            "{}: sample of an undeclared family",
            at()
        );
        out.samples.push(sample);
    }
    check_histograms(&out)?;
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("a sample needs a value")?;
    let name = &line[..name_end];
    ensure!(is_name(name), "bad metric name {name:?}");
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let consumed;
        loop {
            // label name
            let start = match chars.peek() {
                Some((_, '}')) => {
                    consumed = chars.next().expect("peeked").0 + 1;
                    break;
                }
                Some((i, _)) => *i,
                None => bail!("unterminated label set"),
            };
            let eq = inner[start..].find('=').context("a label needs =")? + start;
            let label = &inner[start..eq];
            ensure!(is_label_name(label), "bad label name {label:?}");
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            ensure!(
                matches!(chars.next(), Some((_, '"'))),
                "a label value must be quoted"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        other => bail!("bad escape {other:?} in a label value"),
                    },
                    Some((_, '\n')) => bail!("newline in a label value"),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            ensure!(
                labels.insert(label.to_owned(), value).is_none(),
                "label {label} twice"
            );
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                other => bail!("expected , or }} after a label, found {other:?}"),
            }
        }
        rest = &inner[consumed..];
    }
    let rest = rest.strip_prefix(' ').context("a space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().context("a value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    ensure!(fields.next().is_none(), "trailing fields");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The labels of a series, without `le`.
type Labels = Vec<(String, String)>;
/// Buckets `(le, count)` in order, and the `_count`.
type Series = (Vec<(f64, f64)>, Option<f64>);

fn check_histograms(out: &Exposition) -> Result<()> {
    for (name, kind) in &out.types {
        if kind != "histogram" {
            continue;
        }
        // Per label set (without `le`): the buckets in order, and the count.
        let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
        for s in &out.samples {
            let key = || {
                s.labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            if s.name == format!("{name}_bucket") {
                let le = parse_value(s.labels.get("le").context("a bucket needs le")?)?;
                series.entry(key()).or_default().0.push((le, s.value));
            } else if s.name == format!("{name}_count") {
                series.entry(key()).or_default().1 = Some(s.value);
            }
        }
        for (labels, (buckets, count)) in series {
            ensure!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{name}{labels:?}: buckets are not increasing and cumulative"
            );
            let last = buckets.last().context("a histogram needs buckets")?;
            ensure!(
                last.0 == f64::INFINITY,
                "{name}{labels:?}: the last bucket is not +Inf"
            );
            ensure!(
                Some(last.1) == count,
                "{name}{labels:?}: +Inf bucket {} != count {count:?}",
                last.1
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_text_parses_and_bad_text_does_not() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{verb=\"get\",path=\"x\\\"y\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n# EOF\n";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.sum("a_total", &[("verb", "get")]), 3.0);
        assert_eq!(parsed.samples[0].labels["path"], "x\"y");
        for bad in [
            "a_total 1\n",                                           // undeclared
            "# TYPE a counter\na{x=1} 1\n",                          // unquoted
            "# TYPE a counter\na 1 2 3\n",                           // trailing
            "# TYPE a counter\na one\n",                             // not a float
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n", // no +Inf
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
