//! The process behind a connection, read from `/proc` at accept time: its
//! command, executable and parent chain, so policy and audit can tell
//! `kubectl` launched by an agent's tool runner from anything else.

use std::io;
use std::path::Path;

use super::ProcessInfo;

/// Parents followed at most; the chain of a container process to the
/// node's init is far shorter.
pub const MAX_PARENT_DEPTH: usize = 16;

impl ProcessInfo {
    /// Reads `/proc/PID`. Fails only when the process is gone before its
    /// command could be read; an unreadable executable (the process exited
    /// and is a zombie, or belongs to another user) leaves `executable`
    /// empty, an unreadable uid is `u32::MAX`, and the parent chain stops
    /// where it can no longer be read.
    pub fn from_proc(pid: u32) -> io::Result<Self> {
        Self::from_proc_root(Path::new("/proc"), pid)
    }

    /// As [`Self::from_proc`], with `/proc` mounted at `proc_root`.
    pub fn from_proc_root(proc_root: &Path, pid: u32) -> io::Result<Self> {
        let dir = proc_root.join(pid.to_string());
        let command = read_comm(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/{pid}/comm: {e}")))?;
        let executable = std::fs::read_link(dir.join("exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let uid = read_uid(&dir).unwrap_or(u32::MAX);
        let mut parents = Vec::new();
        let mut current = pid;
        while parents.len() < MAX_PARENT_DEPTH {
            let Some(parent) = read_ppid(&proc_root.join(current.to_string())) else {
                break;
            };
            // Stop at init (and at the idle task's 0); never loop.
            if parent <= 1 || parent == pid || parents.iter().any(|(p, _)| *p == parent) {
                break;
            }
            let Ok(comm) = read_comm(&proc_root.join(parent.to_string())) else {
                break;
            };
            parents.push((parent, comm));
            current = parent;
        }
        Ok(Self {
            pid,
            uid,
            command,
            executable,
            parents,
        })
    }
}

impl ProcessInfo {
    /// The executable, or `[comm]` (as `ps` shows a process without one)
    /// when it could not be read.
    pub fn executable_or_command(&self) -> String {
        if self.executable.is_empty() {
            format!("[{}]", self.command)
        } else {
            self.executable.clone()
        }
    }

    /// `kubectl pid 4242 uid 1000`.
    pub fn summary(&self) -> String {
        format!("{} pid {} uid {}", self.command, self.pid, self.uid)
    }

    /// The parent chain, nearest first: `sh(4200) < agent(4100)`.
    pub fn parents_line(&self) -> String {
        self.parents
            .iter()
            .map(|(pid, comm)| format!("{comm}({pid})"))
            .collect::<Vec<_>>()
            .join(" < ")
    }

    /// The lineage as recordings keep it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "uid": self.uid,
            "command": self.command,
            "executable": self.executable,
            "parents": self
                .parents
                .iter()
                .map(|(pid, comm)| serde_json::json!({"pid": pid, "command": comm}))
                .collect::<Vec<_>>(),
        })
    }
}

fn read_comm(dir: &Path) -> io::Result<String> {
    let comm = std::fs::read_to_string(dir.join("comm"))?;
    Ok(comm.trim_end_matches('\n').to_string())
}

/// The real uid, from the `Uid:` line of `status`.
fn read_uid(dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The fourth field of `stat`; the command (second field) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn read_ppid(dir: &Path) -> Option<u32> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    parse_ppid(&stat)
}

fn parse_ppid(stat: &str) -> Option<u32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    fn exe_of(pid: u32) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }

    #[test]
    fn stat_with_a_hostile_command_name() {
        assert_eq!(parse_ppid("42 (a) b (c) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("42 (kubectl) R 1234 42"), Some(1234));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn this_test_process() {
        let me = std::process::id();
        let info = ProcessInfo::from_proc(me).unwrap();
        assert_eq!(info.pid, me);
        assert!(!info.command.is_empty());
        assert_eq!(
            PathBuf::from(&info.executable),
            std::env::current_exe().unwrap()
        );
        assert_eq!(info.uid, nix::unistd::getuid().as_raw());
        // The parent is whoever launched the test binary.
        let parent = std::os::unix::process::parent_id();
        if parent > 1 {
            assert_eq!(info.parents[0].0, parent);
        }
        assert!(info.parents.len() <= MAX_PARENT_DEPTH);
    }

    #[test]
    fn a_spawned_child_and_its_exit() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until the child has exec'd, it still carries this thread's name.
        let exec_seen = (0..200).any(|_| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim_end() == "sleep" || {
                std::thread::sleep(std::time::Duration::from_millis(10));
                false
            }
        });
        assert!(exec_seen, "the child never became sleep");
        let info = ProcessInfo::from_proc(pid).unwrap();
        assert_eq!(info.command, "sleep");
        assert!(info.executable.ends_with("sleep"), "{}", info.executable);
        assert_eq!(info.parents[0].0, std::process::id());
        assert_eq!(
            info.parents[0].1,
            ProcessInfo::from_proc(std::process::id()).unwrap().command
        );

        // Killed but not reaped: a zombie keeps comm and stat, loses exe.
        child.kill().unwrap();
        let zombie_gone = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            exe_of(pid).is_none()
        });
        assert!(zombie_gone, "the killed child still has an executable");
        let info = ProcessInfo::from_proc(pid).unwrap();
        assert_eq!(info.command, "sleep");
        assert_eq!(info.executable, "");

        // Reaped: the process is gone, and the error says which.
        child.wait().unwrap();
        let error = ProcessInfo::from_proc(pid).unwrap_err();
        assert!(error.to_string().contains(&format!("/proc/{pid}/comm")));
    }
}
