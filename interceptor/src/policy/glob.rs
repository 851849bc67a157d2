//! Globs for policy patterns, compiled once: `*` matches any run of
//! characters (including none and including `/`), `?` exactly one character,
//! `\*`, `\?` and `\\` the character itself. Everything else is literal.
//! Patterns without wildcards compare as plain strings; `prefix*`, `*suffix`
//! and `*` take fast paths. Matching never allocates.

use std::fmt;

/// One compiled glob.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    kind: Kind,
    /// The whole pattern, for matching over joined command words.
    tokens: Box<[Token]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Pattern,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Char(char),
    One,
    Star,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        let tokens = tokenize(pattern);
        let literal = |ts: &[Token]| -> Option<String> {
            ts.iter()
                .map(|t| match t {
                    Token::Char(c) => Some(*c),
                    _ => None,
                })
                .collect()
        };
        let stars = tokens.iter().filter(|t| **t == Token::Star).count();
        let kind = if tokens.iter().all(|t| *t == Token::Star) && stars > 0 {
            Kind::Any
        } else if let Some(exact) = literal(&tokens) {
            Kind::Exact(exact.into())
        } else if stars == 1 && tokens.last() == Some(&Token::Star) {
            match literal(&tokens[..tokens.len() - 1]) {
                Some(prefix) => Kind::Prefix(prefix.into()),
                None => Kind::Pattern,
            }
        } else if stars == 1 && tokens.first() == Some(&Token::Star) {
            match literal(&tokens[1..]) {
                Some(suffix) => Kind::Suffix(suffix.into()),
                None => Kind::Pattern,
            }
        } else {
            Kind::Pattern
        };
        Glob {
            source: pattern.into(),
            kind,
            tokens: tokens.into(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// `true` when the pattern is `*` (or `**`...): it matches everything.
    pub fn is_any(&self) -> bool {
        matches!(self.kind, Kind::Any)
    }

    pub fn matches(&self, text: &str) -> bool {
        match &self.kind {
            Kind::Any => true,
            Kind::Exact(s) => **s == *text,
            Kind::Prefix(p) => text.starts_with(&**p),
            Kind::Suffix(s) => text.ends_with(&**s),
            Kind::Pattern => match_tokens(&self.tokens, text.chars()),
        }
    }

    /// Matches the words of a command line joined with single spaces,
    /// without joining them into a new string.
    pub fn matches_words(&self, words: &[String]) -> bool {
        let joined = words
            .iter()
            .enumerate()
            .flat_map(|(i, word)| (i > 0).then_some(' ').into_iter().chain(word.chars()));
        match &self.kind {
            Kind::Any => true,
            _ => match_tokens(&self.tokens, joined),
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn tokenize(pattern: &str) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => Token::Star,
            '?' => Token::One,
            '\\' => Token::Char(chars.next().unwrap_or('\\')),
            c => Token::Char(c),
        });
    }
    tokens
}

/// The classic linear-backtracking glob match over a cloneable character
/// iterator: on a mismatch, retry from the last `*` with one more character
/// swallowed.
fn match_tokens<I>(tokens: &[Token], text: I) -> bool
where
    I: Iterator<Item = char> + Clone,
{
    let mut p = 0;
    let mut t = text;
    let mut backtrack: Option<(usize, I)> = None;
    loop {
        let mut next = t.clone();
        let c = next.next();
        match (tokens.get(p), c) {
            (Some(Token::Star), _) => {
                p += 1;
                backtrack = Some((p, t.clone()));
                continue;
            }
            (Some(Token::One), Some(_)) => {
                p += 1;
                t = next;
                continue;
            }
            (Some(Token::Char(want)), Some(c)) if *want == c => {
                p += 1;
                t = next;
                continue;
            }
            (None, None) => return true,
            _ => {}
        }
        match backtrack.take() {
            Some((star_p, mut star_t)) => {
                if star_t.next().is_none() {
                    return false;
                }
                p = star_p;
                t = star_t.clone();
                backtrack = Some((star_p, star_t));
            }
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        for (pattern, text, want) in [
            ("*", "", true),
            ("*", "anything/at all", true),
            ("prod", "prod", true),
            ("prod", "prod-a", false),
            ("prod-*", "prod-a", true),
            ("prod-*", "prod-", true),
            ("prod-*", "dev-a", false),
            ("*-prod", "eu-prod", true),
            ("*-prod", "eu-prod-1", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("web-?", "web-1", true),
            ("web-?", "web-10", false),
            ("*db*", "orders-db-0", true),
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("ü*", "über", true),
            ("?ber", "über", true),
        ] {
            assert_eq!(Glob::new(pattern).matches(text), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn command_words_match_as_one_line() {
        let words: Vec<String> = ["rm", "-rf", "/data"].map(String::from).into();
        for (pattern, want) in [
            ("rm *", true),
            ("rm -rf /data", true),
            ("rm", false),
            ("*-rf*", true),
            ("*", true),
            ("sh*", false),
            ("rm -rf /dat?", true),
        ] {
            assert_eq!(Glob::new(pattern).matches_words(&words), want, "{pattern}");
        }
    }
}
