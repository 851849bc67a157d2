//! Pattern rules on text: private keys, cloud keys, tokens, passwords in
//! connection strings and assignments, and the operator's own regexes.
//!
//! A rule is a byte regex. When it has a capture group named `secret`, only
//! that group is replaced (so `password=hunter2` becomes
//! `password=<masked by chaperone: password-assignment>`); otherwise the whole
//! match is. One `RegexSet` pass tells which rules can match a text, so a text
//! without secrets costs one scan.

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::{MaskConfigError, PatternRule, marker};

/// Built-in rules: `(name, regex)`. Names appear in the marker and in stats.
pub(crate) const BUILTIN: &[(&str, &str)] = &[
    // A PEM block; an unterminated one is masked to the end of the text.
    (
        "pem-private-key",
        r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\z)",
    ),
    (
        "aws-access-key-id",
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b",
    ),
    (
        "aws-secret-access-key",
        r#"(?i)aws_?secret_?access_?key["']?\s*[:=]\s*["']?(?P<secret>[A-Za-z0-9/+=]{40})"#,
    ),
    ("gcp-api-key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    (
        "azure-account-key",
        r"(?i)\b(?:AccountKey|SharedAccessKey|sig)=(?P<secret>[A-Za-z0-9%+/]{20,}=*)",
    ),
    (
        "github-token",
        r"\b(?:gh[pousr]|github_pat)_[A-Za-z0-9_]{30,}",
    ),
    ("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
    ),
    (
        "bearer-token",
        r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9\-._~+/]{8,}=*)",
    ),
    (
        "password-in-url",
        r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^:@/\s]*:(?P<secret>[^@/\s]+)@",
    ),
    (
        "password-assignment",
        r#"(?i)\b[\w.-]*(?:passw(?:or)?d|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credentials?)["']?\s*[:=]\s*["']?(?P<secret>[^\s"',;&<>]+)"#,
    ),
];

/// Default regex for environment variable names whose values are masked
/// whole, whatever they look like.
pub(crate) const SENSITIVE_ENV_NAMES: &str =
    r"(?i)passw|pwd|secret|token|api_?key|access_?key|private_?key|credential|auth";

/// The compiled pattern rules.
#[derive(Debug)]
pub(crate) struct Patterns {
    set: RegexSet,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    regex: Regex,
    secret_group: Option<usize>,
}

/// The byte range of one secret inside a text, and the rule that found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hit {
    pub start: usize,
    pub end: usize,
    pub rule: usize,
    /// Start of the whole match (the context before a `secret` group):
    /// a stream must not be cut between it and the secret.
    pub context: usize,
}

const REGEX_SIZE_LIMIT: usize = 4 << 20;

impl Patterns {
    pub(crate) fn compile(
        builtins: &[String],
        disabled: &[String],
        extra: &[PatternRule],
    ) -> Result<Self, MaskConfigError> {
        for name in builtins.iter().chain(disabled) {
            if !BUILTIN.iter().any(|(builtin, _)| builtin == name) {
                return Err(MaskConfigError::UnknownBuiltin(name.clone()));
            }
        }
        let enabled = BUILTIN.iter().filter(|(name, _)| {
            (builtins.is_empty() || builtins.iter().any(|b| b == name))
                && !disabled.iter().any(|d| d == name)
        });
        let mut sources: Vec<(String, String)> = enabled
            .map(|(name, re)| ((*name).to_owned(), (*re).to_owned()))
            .collect();
        for rule in extra {
            if rule.name.is_empty() {
                return Err(MaskConfigError::Pattern {
                    name: rule.name.clone(),
                    reason: "a pattern needs a name".into(),
                });
            }
            sources.push((rule.name.clone(), rule.regex.clone()));
        }
        let mut rules = Vec::with_capacity(sources.len());
        for (name, source) in &sources {
            let regex = RegexBuilder::new(source)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| MaskConfigError::Pattern {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
            let secret_group = regex
                .capture_names()
                .position(|group| group == Some("secret"));
            rules.push(Rule {
                name: name.clone(),
                regex,
                secret_group,
            });
        }
        let set = RegexSetBuilder::new(sources.iter().map(|(_, re)| re))
            .size_limit(REGEX_SIZE_LIMIT * 4)
            .build()
            .map_err(|e| MaskConfigError::Pattern {
                name: "(all patterns)".into(),
                reason: e.to_string(),
            })?;
        Ok(Self { set, rules })
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }

    pub(crate) fn rule_name(&self, rule: usize) -> &str {
        &self.rules[rule].name
    }

    /// The secrets in `text`, sorted and merged where they overlap.
    pub(crate) fn hits(&self, text: &[u8], hits: &mut Vec<Hit>) {
        hits.clear();
        if self.rules.is_empty() {
            return;
        }
        let matched = self.set.matches(text);
        if !matched.matched_any() {
            return;
        }
        for index in matched.iter() {
            let rule = &self.rules[index];
            match rule.secret_group {
                Some(group) => {
                    for caps in rule.regex.captures_iter(text) {
                        let context = caps.get(0).map_or(0, |m| m.start());
                        let span = caps.get(group).or_else(|| caps.get(0));
                        if let Some(m) = span.filter(|m| !m.is_empty()) {
                            hits.push(Hit {
                                start: m.start(),
                                end: m.end(),
                                rule: index,
                                context,
                            });
                        }
                    }
                }
                None => {
                    for m in rule.regex.find_iter(text).filter(|m| !m.is_empty()) {
                        hits.push(Hit {
                            start: m.start(),
                            end: m.end(),
                            rule: index,
                            context: m.start(),
                        });
                    }
                }
            }
        }
        hits.sort_unstable_by_key(|hit| (hit.start, std::cmp::Reverse(hit.end), hit.rule));
        let mut merged = 0;
        for i in 0..hits.len() {
            if merged > 0 && hits[i].start < hits[merged - 1].end {
                hits[merged - 1].end = hits[merged - 1].end.max(hits[i].end);
                hits[merged - 1].context = hits[merged - 1].context.min(hits[i].context);
            } else {
                hits[merged] = hits[i];
                merged += 1;
            }
        }
        hits.truncate(merged);
    }

    /// Writes `text` with `hits` replaced by markers.
    pub(crate) fn write_masked(&self, text: &[u8], hits: &[Hit], out: &mut Vec<u8>) {
        let mut at = 0;
        for hit in hits {
            out.extend_from_slice(&text[at..hit.start]);
            marker::pattern(self.rule_name(hit.rule), out);
            at = hit.end;
        }
        out.extend_from_slice(&text[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> String {
        let patterns = Patterns::compile(&[], &[], &[]).unwrap();
        let mut hits = Vec::new();
        patterns.hits(text.as_bytes(), &mut hits);
        let mut out = Vec::new();
        patterns.write_masked(text.as_bytes(), &hits, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn builtins_mask_what_they_name_and_keep_the_context() {
        let cases = [
            (
                "key: AKIAIOSFODNN7EXAMPLE end",
                "key: <masked by chaperone: aws-access-key-id> end",
            ),
            (
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws_secret_access_key = <masked by chaperone: aws-secret-access-key>",
            ),
            (
                "url=postgres://app:hunter2@db:5432/app",
                "url=postgres://app:<masked by chaperone: password-in-url>@db:5432/app",
            ),
            (
                "Authorization: Bearer abcdefgh12345678",
                "Authorization: Bearer <masked by chaperone: bearer-token>",
            ),
            (
                "DB_PASSWORD=hunter2 next",
                "DB_PASSWORD=<masked by chaperone: password-assignment> next",
            ),
            (
                r#"{"token": "s3cr3t"}"#,
                r#"{"token": "<masked by chaperone: password-assignment>"}"#,
            ),
            (
                "t=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl done",
                "t=<masked by chaperone: jwt> done",
            ),
            (
                "gcp AIzaSyA1234567890abcdefghijklmnopqrstuv",
                "gcp <masked by chaperone: gcp-api-key>",
            ),
            (
                "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=bm90LWEtcmVhbC1rZXktYXQtYWxs==;",
                "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=<masked by chaperone: azure-account-key>;",
            ),
            (
                "a\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc\n-----END RSA PRIVATE KEY-----\nb",
                "a\n<masked by chaperone: pem-private-key>\nb",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\nMIIE unterminated",
                "<masked by chaperone: pem-private-key>",
            ),
            ("nothing to see here", "nothing to see here"),
        ];
        for (input, expected) in cases {
            assert_eq!(masked(input), expected, "input: {input}");
        }
    }

    #[test]
    fn overlapping_hits_merge_into_one_marker() {
        // bearer-token and jwt both match the same token: one marker, named
        // after the first rule in order.
        let out = masked("Authorization: Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.");
        assert_eq!(out, "Authorization: Bearer <masked by chaperone: jwt>");
    }

    #[test]
    fn configuration_selects_builtins_and_adds_named_regexes() {
        let extra = [PatternRule {
            name: "internal-token".into(),
            regex: r"itk_[a-z0-9]{8}".into(),
        }];
        let patterns = Patterns::compile(&[], &["password-assignment".to_owned()], &extra).unwrap();
        let text = b"password=x itk_abcd1234";
        let mut hits = Vec::new();
        patterns.hits(text, &mut hits);
        let mut out = Vec::new();
        patterns.write_masked(text, &hits, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "password=x <masked by chaperone: internal-token>"
        );

        let err = Patterns::compile(&["no-such".to_owned()], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("no-such"), "{err}");
        let bad = [PatternRule {
            name: "broken".into(),
            regex: "(".into(),
        }];
        let err = Patterns::compile(&[], &[], &bad).unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }
}
