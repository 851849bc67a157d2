//! The query of an `exec`, `attach` or `portforward` request.

use super::process::Pipes;

/// `?command=...&container=...&stdin=...&stdout=...&stderr=...&tty=...`
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub pipes: Pipes,
    /// `ports=` of a port-forward request (may repeat, comma separated).
    pub ports: Vec<u16>,
}

impl StreamOptions {
    pub fn from_query(query: Option<&str>) -> Self {
        let mut options = StreamOptions::default();
        for (key, value) in pairs(query.unwrap_or_default()) {
            let flag = matches!(value.as_str(), "true" | "1" | "True" | "TRUE");
            match key.as_str() {
                "command" => options.command.push(value),
                "container" => options.container = Some(value),
                "stdin" => options.pipes.stdin = flag,
                "stdout" => options.pipes.stdout = flag,
                "stderr" => options.pipes.stderr = flag,
                "tty" => options.pipes.tty = flag,
                "ports" => options.ports.extend(
                    value
                        .split(',')
                        .filter_map(|p| p.trim().parse::<u16>().ok()),
                ),
                _ => {}
            }
        }
        options
    }
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k), decode(v))
    })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubectl_exec_queries() {
        let o = StreamOptions::from_query(Some(
            "command=sh&command=-c&command=echo+%22a+b%22%3Bexit+3&container=app&stderr=true&stdin=true&stdout=true",
        ));
        assert_eq!(o.command, ["sh", "-c", "echo \"a b\";exit 3"]);
        assert_eq!(o.container.as_deref(), Some("app"));
        assert!(o.pipes.stdin && o.pipes.stdout && o.pipes.stderr && !o.pipes.tty);
        assert_eq!(
            StreamOptions::from_query(Some("ports=80,443&ports=8080")).ports,
            [80, 443, 8080]
        );
        assert_eq!(decode("100%"), "100%");
    }
}
