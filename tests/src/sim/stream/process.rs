//! The "container side" of a stream: the pipes a process sees (stdin, stdout,
//! stderr, maybe a terminal) and the small set of programs the simulator runs.
//!
//! Transports (WebSocket, SPDY) create the pipes with [`pipes`], hand the
//! [`ProcessIo`] to [`run`] and move bytes between the client and the
//! [`TransportEnds`].

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::shell;

/// How many chunks may wait in a pipe before the writer waits: the
/// backpressure that keeps a fast producer from filling memory.
const PIPE_CHUNKS: usize = 16;

/// What runs in the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// `exec`: run this command line.
    Exec(Vec<String>),
    /// `attach`: the container's main process, which echoes its stdin.
    Attach,
}

/// What the container's processes see of it.
#[derive(Clone, Debug, Default)]
pub struct Container {
    /// The pod name, which is the container's hostname.
    pub hostname: String,
    /// The container's environment from the pod spec.
    pub env: Vec<(String, String)>,
}

impl Container {
    /// The full environment of a process: what a container runtime adds
    /// (`PATH`, `HOSTNAME`), then the pod spec's variables, in that order.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOSTNAME".to_string(), self.hostname.clone()),
        ];
        for (name, value) in &self.env {
            vars.retain(|(n, _)| n != name);
            vars.push((name.clone(), value.clone()));
        }
        vars
    }
}

/// Which pipes the client asked for (the `stdin`, `stdout`, `stderr` and
/// `tty` query parameters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pipes {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The process side of the pipes.
pub struct ProcessIo {
    pub stdin: Stdin,
    pub stdout: Output,
    pub stderr: Output,
    pub tty: bool,
}

/// The transport side of the pipes. Dropping `stdin` is end-of-file for the
/// process; `stdout` and `stderr` end when the process has finished.
pub struct TransportEnds {
    pub stdin: Option<mpsc::Sender<Bytes>>,
    pub stdout: Option<mpsc::Receiver<Bytes>>,
    pub stderr: Option<mpsc::Receiver<Bytes>>,
}

/// Creates the pipes. With a terminal, stderr is the terminal too (the
/// kubelet does not open a separate stderr stream for a tty), output newlines
/// become CR LF and stdin is cooked by a line discipline that echoes.
pub fn pipes(asked: Pipes) -> (ProcessIo, TransportEnds) {
    let (stdin_tx, stdin_rx) = if asked.stdin {
        let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (stdout, stdout_rx) = if asked.stdout {
        let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
        (
            Output {
                tx: Some(tx),
                onlcr: asked.tty,
            },
            Some(rx),
        )
    } else {
        (Output::discard(), None)
    };
    let (stderr, stderr_rx) = if asked.tty {
        (stdout.clone(), None)
    } else if asked.stderr {
        let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
        (
            Output {
                tx: Some(tx),
                onlcr: false,
            },
            Some(rx),
        )
    } else {
        (Output::discard(), None)
    };
    let terminal = asked.tty.then(|| Terminal {
        echo: stdout.clone(),
        line: Vec::new(),
    });
    let io = ProcessIo {
        stdin: Stdin {
            rx: stdin_rx,
            pending: BytesMut::new(),
            terminal,
            lines: std::collections::VecDeque::new(),
        },
        stdout,
        stderr,
        tty: asked.tty,
    };
    let ends = TransportEnds {
        stdin: stdin_tx,
        stdout: stdout_rx,
        stderr: stderr_rx,
    };
    (io, ends)
}

/// Runs `program` to completion and returns its exit code.
pub async fn run(program: Program, mut io: ProcessIo, container: Container) -> i32 {
    match program {
        Program::Exec(argv) => {
            let mut shell = shell::Shell::new(&container);
            shell.exec_direct(&argv, &mut io).await
        }
        Program::Attach => shell::cat(&mut io).await,
    }
}

// === impl Output ===

/// A process's stdout or stderr. Writing to a pipe the client has gone away
/// from fails with `BrokenPipe`, which ends the process like SIGPIPE.
#[derive(Clone, Debug)]
pub struct Output {
    tx: Option<mpsc::Sender<Bytes>>,
    /// Terminal output processing: `\n` becomes `\r\n`.
    onlcr: bool,
}

impl Output {
    /// An output nobody asked for (`/dev/null`).
    pub fn discard() -> Self {
        Output {
            tx: None,
            onlcr: false,
        }
    }

    pub async fn write(&self, data: &[u8]) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        if data.is_empty() {
            return Ok(());
        }
        let chunk = if self.onlcr {
            let mut out = Vec::with_capacity(data.len() + 8);
            for &b in data {
                if b == b'\n' {
                    out.push(b'\r');
                }
                out.push(b);
            }
            Bytes::from(out)
        } else {
            Bytes::copy_from_slice(data)
        };
        tx.send(chunk)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }

    /// Writes raw terminal bytes (echo), without output processing.
    async fn write_raw(&self, data: &[u8]) -> io::Result<()> {
        let raw = Output {
            tx: self.tx.clone(),
            onlcr: false,
        };
        raw.write(data).await
    }
}

// === impl Stdin ===

/// What a read from stdin gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Data(Bytes),
    /// Ctrl-C typed on the terminal.
    Interrupt,
    Eof,
}

/// A process's stdin: raw bytes from the client, or with a terminal, cooked
/// lines (echoed, with backspace, Ctrl-C and Ctrl-D handled as a Linux tty
/// in canonical mode does).
pub struct Stdin {
    rx: Option<mpsc::Receiver<Bytes>>,
    /// Bytes read but not yet returned by `read_line`.
    pending: BytesMut,
    terminal: Option<Terminal>,
    /// Cooked input not yet handed to the process.
    lines: std::collections::VecDeque<Input>,
}

struct Terminal {
    echo: Output,
    line: Vec<u8>,
}

impl Stdin {
    /// A stdin that is at end-of-file from the start.
    #[cfg(test)]
    pub fn closed() -> Self {
        Stdin {
            rx: None,
            pending: BytesMut::new(),
            terminal: None,
            lines: Default::default(),
        }
    }

    /// The next chunk of input (a whole line on a terminal).
    pub async fn read(&mut self) -> Input {
        if !self.pending.is_empty() {
            return Input::Data(self.pending.split().freeze());
        }
        self.read_chunk().await
    }

    /// The next line without its newline; the last line may lack one.
    /// `None` at end-of-file.
    pub async fn read_line(&mut self) -> Option<Result<String, Interrupted>> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line = self.pending.split_to(pos + 1);
                return Some(Ok(String::from_utf8_lossy(&line[..pos]).into_owned()));
            }
            match self.read_chunk().await {
                Input::Data(chunk) => self.pending.extend_from_slice(&chunk),
                Input::Interrupt => {
                    self.pending.clear();
                    return Some(Err(Interrupted));
                }
                Input::Eof if self.pending.is_empty() => return None,
                Input::Eof => {
                    let rest = self.pending.split();
                    return Some(Ok(String::from_utf8_lossy(&rest).into_owned()));
                }
            }
        }
    }

    /// On a terminal: resolves when Ctrl-C is typed, keeping other typed
    /// input for later reads (a `sleep` interrupted from the keyboard).
    /// Never resolves without a terminal.
    pub async fn interrupted(&mut self) {
        if self.terminal.is_none() {
            return std::future::pending().await;
        }
        loop {
            if let Some(at) = self.lines.iter().position(|i| *i == Input::Interrupt) {
                // Input typed before Ctrl-C is discarded, as a tty flushes it.
                self.lines.drain(..=at);
                return;
            }
            let Some(rx) = &mut self.rx else {
                return std::future::pending().await;
            };
            match rx.recv().await {
                Some(chunk) => {
                    if let Some(term) = &mut self.terminal
                        && term.cook(&chunk, &mut self.lines).await.is_err()
                    {
                        self.rx = None;
                    }
                }
                None => {
                    self.rx = None;
                    return std::future::pending().await;
                }
            }
        }
    }

    async fn read_chunk(&mut self) -> Input {
        loop {
            if let Some(input) = self.lines.pop_front() {
                return input;
            }
            let Some(rx) = &mut self.rx else {
                return Input::Eof;
            };
            let Some(chunk) = rx.recv().await else {
                self.rx = None;
                if let Some(term) = &mut self.terminal
                    && !term.line.is_empty()
                {
                    return Input::Data(Bytes::from(std::mem::take(&mut term.line)));
                }
                return Input::Eof;
            };
            match &mut self.terminal {
                None => return Input::Data(chunk),
                Some(term) => {
                    if term.cook(&chunk, &mut self.lines).await.is_err() {
                        self.rx = None;
                    }
                }
            }
        }
    }
}

/// Ctrl-C was typed while reading a line.
#[derive(Debug, PartialEq, Eq)]
pub struct Interrupted;

impl Terminal {
    /// The canonical-mode line discipline for one chunk of typed bytes.
    async fn cook(
        &mut self,
        typed: &[u8],
        out: &mut std::collections::VecDeque<Input>,
    ) -> io::Result<()> {
        for &b in typed {
            match b {
                b'\r' | b'\n' => {
                    self.echo.write_raw(b"\r\n").await?;
                    let mut line = std::mem::take(&mut self.line);
                    line.push(b'\n');
                    out.push_back(Input::Data(Bytes::from(line)));
                }
                0x7f | 0x08 => {
                    if !self.line.is_empty() {
                        // Erase one character, UTF-8 aware.
                        while let Some(last) = self.line.pop() {
                            if last & 0xc0 != 0x80 {
                                break;
                            }
                        }
                        self.echo.write_raw(b"\x08 \x08").await?;
                    }
                }
                0x03 => {
                    self.echo.write_raw(b"^C\r\n").await?;
                    self.line.clear();
                    out.push_back(Input::Interrupt);
                }
                0x04 => {
                    if self.line.is_empty() {
                        out.push_back(Input::Eof);
                    } else {
                        out.push_back(Input::Data(Bytes::from(std::mem::take(&mut self.line))));
                    }
                }
                _ => {
                    self.echo.write_raw(&[b]).await?;
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }
}

/// A spawned task that is aborted when its owner drops it, so a stream whose
/// client went away leaves nothing running (a `sleep 1000`, a blocked `cat`).
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One remote command: what to run, where, with which pipes.
#[derive(Clone, Debug)]
pub struct Command {
    pub program: Program,
    pub pipes: Pipes,
    pub container: Container,
    /// The running process counts as a live stream task too.
    pub live: super::LiveStreams,
}

impl Command {
    /// Starts the process; the transport moves bytes between the client and
    /// the returned ends, then awaits the exit code from the handle.
    pub fn start(&self) -> (AbortOnDrop<i32>, TransportEnds) {
        let (io, ends) = pipes(self.pipes);
        let live = self.live.enter();
        let process = tokio::spawn({
            let program = self.program.clone();
            let container = self.container.clone();
            async move {
                let _live = live;
                run(program, io, container).await
            }
        });
        (AbortOnDrop(process), ends)
    }

    /// The Status JSON for the error stream once the process exited.
    pub fn status(&self, exit: Result<i32, tokio::task::JoinError>) -> String {
        let argv = match &self.program {
            Program::Exec(argv) => argv.clone(),
            Program::Attach => Vec::new(),
        };
        match exit {
            Ok(code) => super::status::exit_status(&argv, code),
            Err(e) => {
                super::status::internal_error(&format!("error executing command in container: {e}"))
            }
        }
    }
}
