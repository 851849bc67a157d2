//! A tiny POSIX-ish shell and the few programs the simulated container has:
//! `echo`, `cat`, `env`, `printenv`, `hostname`, `true`, `false`, `sleep`
//! and `sh` (`-c LINE`, a script on stdin, or interactive on a terminal).
//!
//! Lines are `;`, `&&`, `||` and newline separated commands with single and
//! double quotes, backslash escapes, `$NAME`, `${NAME}` and `$?`, and the
//! redirections `>&2` / `1>&2` (to stderr) and `2>&1` (accepted). Variables
//! are set with `NAME=value`, `export NAME=value` and `unset NAME` (all
//! exported). Exit codes and messages follow dash (Debian's `sh`).

use std::time::Duration;

use super::process::{Container, Input, Output, ProcessIo};

/// The shell's prompt on a terminal (a non-root user's, as the brief of the
/// recording tests expects).
pub const PROMPT: &str = "$ ";

/// Exit code of a command that was not found.
pub const NOT_FOUND: i32 = 127;

/// Exit code after Ctrl-C (128 + SIGINT).
const INTERRUPTED: i32 = 130;

pub struct Shell {
    vars: Vec<(String, String)>,
    status: i32,
}

/// What running one command means for the rest of the line.
enum Flow {
    Continue(i32),
    Exit(i32),
}

impl Shell {
    pub fn new(container: &Container) -> Self {
        Shell {
            vars: container.environment(),
            status: 0,
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Runs `argv` as the container runtime would for `exec`: no shell in
    /// between, so an unknown program is an exec failure.
    pub async fn exec_direct(&mut self, argv: &[String], io: &mut ProcessIo) -> i32 {
        let Some(program) = argv.first() else {
            return 0;
        };
        if !is_program(program) {
            let _ = io
                .stderr
                .write(
                    format!("exec: \"{program}\": executable file not found in $PATH\n").as_bytes(),
                )
                .await;
            return NOT_FOUND;
        }
        let stdout = io.stdout.clone();
        match Box::pin(self.command(argv, io, &stdout)).await {
            Flow::Continue(code) | Flow::Exit(code) => code,
        }
    }

    /// Runs one command line; `Exit` when it ran `exit`.
    async fn line(&mut self, line: &str, io: &mut ProcessIo) -> Flow {
        let commands = match split_commands(line) {
            Ok(commands) => commands,
            Err(message) => return self.syntax_error(message, io).await,
        };
        let mut skip = false;
        for (text, separator) in commands {
            if !skip {
                // Expanded only now, so `$?` sees the previous command.
                let words = match tokenize(&text, self) {
                    Ok(words) => words,
                    Err(message) => return self.syntax_error(message, io).await,
                };
                let mut argv = Vec::new();
                let mut to_stderr = false;
                for word in words {
                    match word {
                        Token::Word(word) => argv.push(word),
                        Token::ToStderr => to_stderr = true,
                    }
                }
                if !argv.is_empty() {
                    let out = if to_stderr {
                        io.stderr.clone()
                    } else {
                        io.stdout.clone()
                    };
                    match self.in_shell(&argv, io, &out).await {
                        Flow::Continue(code) => self.status = code,
                        Flow::Exit(code) => return Flow::Exit(code),
                    }
                }
            }
            skip = match separator {
                Some(Separator::And) => self.status != 0,
                Some(Separator::Or) => self.status == 0,
                _ => false,
            };
        }
        Flow::Continue(self.status)
    }

    async fn syntax_error(&mut self, message: &str, io: &mut ProcessIo) -> Flow {
        let _ = io
            .stderr
            .write(format!("sh: 1: Syntax error: {message}\n").as_bytes())
            .await;
        self.status = 2;
        Flow::Continue(2)
    }

    /// Sets `NAME=value` (a plain `NAME` is already exported: nothing to do).
    fn assign(&mut self, word: &str) {
        if let Some((name, value)) = assignment(word) {
            match self.vars.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => *v = value.to_string(),
                None => self.vars.push((name.to_string(), value.to_string())),
            }
        }
    }

    /// One command inside the shell: builtins first, then programs.
    async fn in_shell(&mut self, argv: &[String], io: &mut ProcessIo, out: &Output) -> Flow {
        match argv[0].as_str() {
            "exit" => {
                let code = match argv.get(1) {
                    None => self.status,
                    Some(n) => match n.parse::<i64>() {
                        Ok(n) => (n & 0xff) as i32,
                        Err(_) => {
                            let _ = io
                                .stderr
                                .write(format!("sh: 1: exit: Illegal number: {n}\n").as_bytes())
                                .await;
                            2
                        }
                    },
                };
                Flow::Exit(code)
            }
            "cd" | ":" => Flow::Continue(0),
            _ if argv.iter().all(|w| assignment(w).is_some()) => {
                for word in argv {
                    self.assign(word);
                }
                Flow::Continue(0)
            }
            "export" => {
                for word in &argv[1..] {
                    self.assign(word);
                }
                Flow::Continue(0)
            }
            "unset" => {
                self.vars.retain(|(name, _)| !argv[1..].contains(name));
                Flow::Continue(0)
            }
            program if is_program(program) => Box::pin(self.command(argv, io, out)).await,
            program => {
                let _ = io
                    .stderr
                    .write(format!("sh: 1: {program}: not found\n").as_bytes())
                    .await;
                Flow::Continue(NOT_FOUND)
            }
        }
    }

    /// The programs of the container. `out` is where stdout goes (stderr
    /// after `>&2`).
    async fn command(&mut self, argv: &[String], io: &mut ProcessIo, out: &Output) -> Flow {
        let args = &argv[1..];
        let code = match program_name(&argv[0]) {
            "echo" => {
                let (newline, words) = match args.first().map(String::as_str) {
                    Some("-n") => (false, &args[1..]),
                    _ => (true, args),
                };
                let mut text = words.join(" ");
                if newline {
                    text.push('\n');
                }
                status_of(out.write(text.as_bytes()).await)
            }
            "cat" => {
                if args.is_empty() || args.iter().all(|a| a == "-") {
                    copy_stdin(io, out).await
                } else {
                    for file in args.iter().filter(|a| *a != "-") {
                        let _ = io
                            .stderr
                            .write(format!("cat: {file}: No such file or directory\n").as_bytes())
                            .await;
                    }
                    1
                }
            }
            "env" => {
                let mut text = String::new();
                for (name, value) in &self.vars {
                    text.push_str(&format!("{name}={value}\n"));
                }
                status_of(out.write(text.as_bytes()).await)
            }
            "printenv" => {
                if args.is_empty() {
                    let mut text = String::new();
                    for (name, value) in &self.vars {
                        text.push_str(&format!("{name}={value}\n"));
                    }
                    status_of(out.write(text.as_bytes()).await)
                } else {
                    let mut code = 0;
                    for name in args {
                        match self.var(name) {
                            Some(value) => {
                                if out.write(format!("{value}\n").as_bytes()).await.is_err() {
                                    return Flow::Continue(1);
                                }
                            }
                            None => code = 1,
                        }
                    }
                    code
                }
            }
            "hostname" => {
                let name = self.var("HOSTNAME").unwrap_or_default().to_string();
                status_of(out.write(format!("{name}\n").as_bytes()).await)
            }
            "true" => 0,
            "false" => 1,
            "sleep" => match args.first().map(|a| a.parse::<f64>()) {
                Some(Ok(secs)) if secs >= 0.0 && secs.is_finite() => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs_f64(secs)) => 0,
                        () = io.stdin.interrupted() => INTERRUPTED,
                    }
                }
                Some(_) => {
                    let _ = io
                        .stderr
                        .write(format!("sleep: invalid time interval '{}'\n", args[0]).as_bytes())
                        .await;
                    1
                }
                None => {
                    let _ = io.stderr.write(b"sleep: missing operand\n").await;
                    1
                }
            },
            "sh" => self.sh(args, io).await,
            _ => NOT_FOUND,
        };
        Flow::Continue(code)
    }

    /// `sh -c LINE`, or `sh` reading commands from stdin (with a prompt on a
    /// terminal).
    async fn sh(&mut self, args: &[String], io: &mut ProcessIo) -> i32 {
        let mut sub = Shell {
            vars: self.vars.clone(),
            status: 0,
        };
        if let Some(first) = args.first() {
            if first == "-c" {
                let Some(line) = args.get(1) else {
                    let _ = io.stderr.write(b"sh: 0: -c requires an argument\n").await;
                    return 2;
                };
                return match Box::pin(sub.line(line, io)).await {
                    Flow::Continue(code) | Flow::Exit(code) => code,
                };
            }
            let _ = io
                .stderr
                .write(format!("sh: 0: cannot open {first}: No such file\n").as_bytes())
                .await;
            return 2;
        }
        loop {
            if io.tty && io.stderr.write(PROMPT.as_bytes()).await.is_err() {
                return sub.status;
            }
            match io.stdin.read_line().await {
                None => return sub.status,
                Some(Err(_interrupted)) => sub.status = INTERRUPTED,
                Some(Ok(line)) => {
                    if let Flow::Exit(code) = Box::pin(sub.line(&line, io)).await {
                        return code;
                    }
                }
            }
        }
    }
}

/// `cat` without files: stdin to `out` until end-of-file.
pub async fn cat(io: &mut ProcessIo) -> i32 {
    let out = io.stdout.clone();
    copy_stdin(io, &out).await
}

async fn copy_stdin(io: &mut ProcessIo, out: &Output) -> i32 {
    loop {
        match io.stdin.read().await {
            Input::Data(chunk) => {
                if out.write(&chunk).await.is_err() {
                    return 1;
                }
            }
            Input::Interrupt => return INTERRUPTED,
            Input::Eof => return 0,
        }
    }
}

/// `NAME=value` split, when `NAME` is a valid variable name.
fn assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
    .then_some((name, value))
}

fn status_of(written: std::io::Result<()>) -> i32 {
    if written.is_ok() { 0 } else { 1 }
}

/// `/bin/sh` and `/usr/bin/env` are `sh` and `env`.
fn program_name(path: &str) -> &str {
    path.strip_prefix("/bin/")
        .or_else(|| path.strip_prefix("/usr/bin/"))
        .unwrap_or(path)
}

fn is_program(name: &str) -> bool {
    matches!(
        program_name(name),
        "echo" | "cat" | "env" | "printenv" | "hostname" | "true" | "false" | "sleep" | "sh"
    )
}

// === tokenizer ===

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    ToStderr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Separator {
    Then,
    And,
    Or,
}

/// Splits a line at `;`, newlines, `&&` and `||` outside quotes; each
/// command keeps the separator that follows it.
fn split_commands(line: &str) -> Result<Vec<(String, Option<Separator>)>, &'static str> {
    let mut commands = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (Some('"'), '\\') => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (None, '\\') => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            (None, '#') if current.is_empty() || current.ends_with([' ', '\t']) => {
                // A comment runs to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                commands.push((std::mem::take(&mut current), Some(Separator::Then)));
            }
            (None, ';' | '\n') => {
                commands.push((std::mem::take(&mut current), Some(Separator::Then)));
            }
            (None, '&') if chars.peek() == Some(&'&') => {
                chars.next();
                commands.push((std::mem::take(&mut current), Some(Separator::And)));
            }
            (None, '|') if chars.peek() == Some(&'|') => {
                chars.next();
                commands.push((std::mem::take(&mut current), Some(Separator::Or)));
            }
            (None, c) => current.push(c),
        }
    }
    if quote.is_some() {
        return Err("Unterminated quoted string");
    }
    commands.push((current, None));
    Ok(commands)
}

/// Splits one command into words and redirections, expanding variables.
fn tokenize(command: &str, shell: &Shell) -> Result<Vec<Token>, &'static str> {
    let mut tokens = Vec::new();
    let mut chars = command.chars().peekable();
    let mut word = String::new();
    let mut in_word = false;
    let finish = |word: &mut String, in_word: &mut bool, tokens: &mut Vec<Token>| {
        if *in_word {
            let w = std::mem::take(word);
            match w.as_str() {
                ">&2" | "1>&2" => tokens.push(Token::ToStderr),
                "2>&1" | "2>/dev/null" | ">/dev/null" => {}
                _ => tokens.push(Token::Word(w)),
            }
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => finish(&mut word, &mut in_word, &mut tokens),
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("Unterminated quoted string"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("Unterminated quoted string"),
                        },
                        Some('$') => expand(&mut chars, shell, &mut word),
                        Some(c) => word.push(c),
                        None => return Err("Unterminated quoted string"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            '$' => {
                in_word = true;
                expand(&mut chars, shell, &mut word);
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    finish(&mut word, &mut in_word, &mut tokens);
    Ok(tokens)
}

/// Expands `$NAME`, `${NAME}` or `$?` (the `$` already taken) into `word`.
fn expand(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, shell: &Shell, word: &mut String) {
    let name: String = match chars.peek() {
        Some('?') => {
            chars.next();
            word.push_str(&shell.status.to_string());
            return;
        }
        Some('{') => {
            chars.next();
            let mut name = String::new();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                name.push(c);
            }
            name
        }
        Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            name
        }
        _ => {
            word.push('$');
            return;
        }
    };
    word.push_str(shell.var(&name).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::process::{Pipes, Program, TransportEnds, pipes, run};
    use super::*;

    fn container() -> Container {
        Container {
            hostname: "web-0".into(),
            env: vec![("GREETING".into(), "hello world".into())],
        }
    }

    /// Runs a program with `input` on stdin; returns (exit, stdout, stderr).
    async fn run_with(argv: &[&str], input: Option<&[u8]>, tty: bool) -> (i32, String, String) {
        let (io, ends) = pipes(Pipes {
            stdin: input.is_some(),
            stdout: true,
            stderr: !tty,
            tty,
        });
        let TransportEnds {
            stdin,
            stdout,
            stderr,
        } = ends;
        if let (Some(tx), Some(input)) = (stdin, input) {
            let input = Bytes::copy_from_slice(input);
            tokio::spawn(async move {
                let _ = tx.send(input).await;
            });
        }
        let program = Program::Exec(argv.iter().map(|s| s.to_string()).collect());
        let process = tokio::spawn(run(program, io, container()));
        let collect = |rx: Option<tokio::sync::mpsc::Receiver<Bytes>>| async move {
            let mut all = Vec::new();
            if let Some(mut rx) = rx {
                while let Some(chunk) = rx.recv().await {
                    all.extend_from_slice(&chunk);
                }
            }
            String::from_utf8(all).unwrap()
        };
        let (out, err) = tokio::join!(collect(stdout), collect(stderr));
        (process.await.unwrap(), out, err)
    }

    #[tokio::test]
    async fn echo_and_exit_codes() {
        assert_eq!(
            run_with(&["echo", "hello"], None, false).await,
            (0, "hello\n".into(), "".into())
        );
        assert_eq!(run_with(&["sh", "-c", "exit 3"], None, false).await.0, 3);
        assert_eq!(
            run_with(&["/bin/sh", "-c", "/bin/echo full path"], None, false).await,
            (0, "full path\n".into(), "".into())
        );
        assert_eq!(run_with(&["false"], None, false).await.0, 1);
        assert_eq!(
            run_with(
                &["sh", "-c", "echo a; echo b >&2 && false || echo c"],
                None,
                false
            )
            .await,
            (0, "a\nc\n".into(), "b\n".into())
        );
        assert_eq!(
            run_with(&["sh", "-c", "false && echo never; echo $?"], None, false).await,
            (0, "1\n".into(), "".into())
        );
    }

    #[tokio::test]
    async fn unknown_commands_exit_127_with_a_message() {
        let (code, out, err) = run_with(&["nosuch", "x"], None, false).await;
        assert_eq!((code, out.as_str()), (127, ""));
        assert!(
            err.contains("\"nosuch\": executable file not found"),
            "{err}"
        );
        let (code, _, err) = run_with(&["sh", "-c", "nosuch"], None, false).await;
        assert_eq!((code, err.as_str()), (127, "sh: 1: nosuch: not found\n"));
    }

    #[tokio::test]
    async fn environment_has_hostname_and_pod_env() {
        let (code, out, _) = run_with(&["env"], None, false).await;
        assert_eq!(code, 0);
        assert!(out.contains("HOSTNAME=web-0\n"), "{out}");
        assert!(out.contains("GREETING=hello world\n"), "{out}");
        assert_eq!(
            run_with(&["printenv", "GREETING"], None, false).await.1,
            "hello world\n"
        );
        assert_eq!(run_with(&["printenv", "NOPE"], None, false).await.0, 1);
        assert_eq!(
            run_with(
                &["sh", "-c", "echo \"$GREETING\" '${HOSTNAME}' ${HOSTNAME}"],
                None,
                false
            )
            .await
            .1,
            "hello world ${HOSTNAME} web-0\n"
        );
    }

    #[tokio::test]
    async fn cat_copies_stdin_until_eof() {
        let (code, out, _) = run_with(&["cat"], Some(b"one\ntwo"), false).await;
        assert_eq!((code, out.as_str()), (0, "one\ntwo"));
        let (code, out, _) =
            run_with(&["sh"], Some(b"echo from-script\nexit 4\necho no\n"), false).await;
        assert_eq!((code, out.as_str()), (4, "from-script\n"));
    }

    #[tokio::test]
    async fn interactive_shell_on_a_terminal_echoes_and_prompts() {
        let (code, out, _) = run_with(&["sh"], Some(b"echo hi\rexot\x7f\x7fit 5\r"), true).await;
        assert_eq!(code, 5);
        // Typed-ahead input echoes at once, as on a real terminal.
        assert_eq!(out, "$ echo hi\r\nexot\x08 \x08\x08 \x08it 5\r\nhi\r\n$ ");
    }

    #[tokio::test]
    async fn ctrl_c_on_a_terminal_interrupts_sleep_and_the_shell_goes_on() {
        let (code, out, _) =
            run_with(&["sh"], Some(b"sleep 100\r\x03echo after $?\rexit\r"), true).await;
        assert_eq!(code, 0);
        assert!(out.contains("sleep 100\r\n^C\r\n"), "{out:?}");
        // Typed ahead, so echoed before the shell prints anything else.
        assert!(out.ends_with("exit\r\n$ after 130\r\n$ "), "{out:?}");
    }

    #[tokio::test]
    async fn variables_are_set_exported_and_unset() {
        let line = "A=1 B='two words'; echo $A $B; export C=3; printenv C; unset A; echo [$A]; env";
        let (code, out, _) = run_with(&["sh", "-c", line], None, false).await;
        assert_eq!(code, 0);
        assert!(out.starts_with("1 two words\n3\n[]\n"), "{out}");
        assert!(out.contains("B=two words\nC=3\n"), "{out}");
        assert!(!out.contains("A=1"), "{out}");
    }

    #[tokio::test]
    async fn syntax_errors_exit_2() {
        let (code, _, err) = run_with(&["sh", "-c", "echo 'open"], None, false).await;
        assert_eq!(code, 2);
        assert!(err.contains("Unterminated quoted string"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_stdin_ends_cat_at_once() {
        let (mut io, _ends) = pipes(Pipes::default());
        io.stdin = super::super::process::Stdin::closed();
        assert_eq!(cat(&mut io).await, 0);
    }
}
