//! Chaperone's pinned state in a bpffs directory: what outlives the node
//! agent when it fails closed, and what `chaperone detach` removes.
//!
//! ```text
//! <bpffs>/links/<program>   one cgroup link per program (chaperone_connect4, …)
//! <bpffs>/maps/<MAP>        the maps the programs and the proxy share
//! ```
//!
//! A pinned link keeps its program attached after the process that made it
//! exits; a pinned map keeps its contents (agent cgroups, targets, refused
//! destinations, the proxy address) for the next node agent.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::bpf_sys;

/// A bpffs directory holding chaperone's pins.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "{path} is not on a BPF filesystem, so nothing could be pinned there and the \
         programs would detach when this process exits (failing open). Mount bpffs \
         (`mount -t bpf bpf /sys/fs/bpf`; in Kubernetes, mount the host's /sys/fs/bpf \
         into the node agent) or point --bpffs / CHAPERONE_BPFFS at a directory on one"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot create the pin directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

impl PinDir {
    /// Uses `root`, creating it (and `links/`, `maps/`) when missing. The
    /// directory must be on a bpffs: refuses otherwise, with what to mount.
    pub fn create(root: &Path) -> Result<PinDir, PinDirError> {
        if !on_bpffs(root) {
            return Err(PinDirError::NotBpffs {
                path: root.to_path_buf(),
            });
        }
        let dir = PinDir {
            root: root.to_path_buf(),
        };
        for path in [dir.links(), dir.maps()] {
            std::fs::create_dir_all(&path).map_err(|source| PinDirError::Create {
                path: path.clone(),
                source,
            })?;
        }
        Ok(dir)
    }

    /// Uses `root` only if it already exists on a bpffs (nothing to adopt
    /// otherwise).
    pub fn existing(root: &Path) -> Option<PinDir> {
        (root.is_dir() && on_bpffs(root)).then(|| PinDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    pub fn map(&self, map: &str) -> PathBuf {
        self.maps().join(map)
    }

    /// Removes the directories if nothing is left in them.
    pub fn remove_empty(&self) {
        let _ = std::fs::remove_dir(self.links());
        let _ = std::fs::remove_dir(self.maps());
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// A node agent's shared hold (`flock(LOCK_SH)`) on a pin directory, kept
/// for its lifetime. Every fail-closed node agent on a node holds one, so an
/// agent that is told chaperone is being removed can tell whether another
/// agent (a DaemonSet re-created before the old pod finished) adopted the
/// same pins and must keep them.
#[derive(Debug)]
pub struct PinHold {
    lock: nix::fcntl::Flock<std::fs::File>,
}

impl PinHold {
    /// Takes a shared hold on `root`, waiting while an agent that is
    /// removing the pins holds it exclusively. `None` when `root` was removed
    /// (or replaced) meanwhile: create it again and retry.
    pub fn take(root: &Path) -> io::Result<Option<PinHold>> {
        use std::os::unix::fs::MetadataExt;
        let dir = match std::fs::File::open(root) {
            Ok(dir) => dir,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockShared)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        let held = lock.metadata()?;
        let same = std::fs::metadata(root)
            .is_ok_and(|now| now.ino() == held.ino() && now.dev() == held.dev());
        Ok(same.then_some(PinHold { lock }))
    }

    /// Makes this hold exclusive if no other agent holds the directory:
    /// `true` then (and the caller may remove the pins); `false` when
    /// another agent holds it (this hold may be lost then: exit soon).
    pub fn only_holder(&self) -> io::Result<bool> {
        match self
            .lock
            .relock(nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EWOULDBLOCK) => Ok(false),
            Err(errno) => Err(errno.into()),
        }
    }
}

/// `true` when `path`, or the nearest ancestor that exists, is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    let mut probe = Some(path);
    while let Some(candidate) = probe {
        if candidate.exists() {
            return nix::sys::statfs::statfs(candidate)
                .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
                .unwrap_or(false);
        }
        probe = candidate.parent();
    }
    false
}

/// What [`detach_all`] removed.
#[derive(Debug, Default)]
pub struct DetachReport {
    /// Links detached from their cgroup and unpinned (`program (link id)`).
    pub links: Vec<String>,
    /// Map pins removed.
    pub maps: Vec<String>,
    /// Anything that could not be removed, and why.
    pub problems: Vec<String>,
}

/// Why [`detach_all`] refused to touch a directory: it is not chaperone's
/// pins on a BPF filesystem. Nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum DetachRefusal {
    #[error(
        "{path} is not on a BPF filesystem, so it holds no pins of chaperone's; nothing was \
         removed. Pass the directory the node agent pinned in (its --bpffs / CHAPERONE_BPFFS; \
         default {default})",
        default = crate::config::DEFAULT_BPFFS
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "{path} is not a directory; nothing was removed. Pass the node agent's --bpffs directory"
    )]
    NotDirectory { path: PathBuf },
    #[error(
        "{path} is not chaperone's pin directory: it holds {found}, which chaperone never pins \
         (it pins only links/chaperone_* and maps/<MAP>); nothing was removed. Pass the node \
         agent's --bpffs directory (default {default}), not a parent of it",
        found = found.join(", "),
        default = crate::config::DEFAULT_BPFFS
    )]
    Foreign { path: PathBuf, found: Vec<String> },
    #[error("cannot read {path}: {source}; nothing was removed")]
    Read { path: PathBuf, source: io::Error },
}

/// Checks that `root` holds only chaperone's pins (links named
/// `chaperone_*` that are BPF links, maps named in capitals that are BPF
/// maps) on a BPF filesystem, before anything is removed.
fn check_pin_dir(root: &Path) -> Result<(), DetachRefusal> {
    let is_bpffs = |path: &Path| {
        nix::sys::statfs::statfs(path)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    if !is_bpffs(root) {
        return Err(DetachRefusal::NotBpffs {
            path: root.to_path_buf(),
        });
    }
    if !root.is_dir() {
        return Err(DetachRefusal::NotDirectory {
            path: root.to_path_buf(),
        });
    }
    let read = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|source| DetachRefusal::Read {
            path: dir.to_path_buf(),
            source,
        })
    };
    let mut foreign = Vec::new();
    for entry in read(root)?.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(matches!(name.as_str(), "links" | "maps") && entry.path().is_dir()) {
            foreign.push(name);
        }
    }
    let dir = PinDir {
        root: root.to_path_buf(),
    };
    for (name, path) in entries(&dir.links()) {
        let is_link = bpf_sys::obj_get(&path).is_ok_and(|fd| {
            use std::os::fd::AsFd;
            bpf_sys::link_info(fd.as_fd()).is_ok()
        });
        if !(name.starts_with("chaperone_") && is_link) {
            foreign.push(format!("links/{name}"));
        }
    }
    for (name, path) in entries(&dir.maps()) {
        let chaperone_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !(chaperone_name && aya::maps::MapInfo::from_pin(&path).is_ok()) {
            foreign.push(format!("maps/{name}"));
        }
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        foreign.sort();
        Err(DetachRefusal::Foreign {
            path: root.to_path_buf(),
            found: foreign,
        })
    }
}

/// Detaches every link pinned under `root` (even while a node agent still
/// holds it) and removes every pin and the directories. Idempotent: a
/// missing `root` is an empty report. Refuses, removing nothing, when
/// `root` is not chaperone's pins on a BPF filesystem (an ordinary
/// directory, bpffs's root with other programs' pins).
pub fn detach_all(root: &Path) -> Result<DetachReport, DetachRefusal> {
    let mut report = DetachReport::default();
    if !root.exists() {
        return Ok(report);
    }
    check_pin_dir(root)?;
    let dir = PinDir {
        root: root.to_path_buf(),
    };
    for (name, path) in entries(&dir.links()) {
        match bpf_sys::obj_get(&path) {
            Ok(fd) => {
                use std::os::fd::AsFd;
                let id = bpf_sys::link_info(fd.as_fd())
                    .map(|info| info.id.to_string())
                    .unwrap_or_else(|_| "?".into());
                if let Err(error) = bpf_sys::link_detach(fd.as_fd()) {
                    report
                        .problems
                        .push(format!("detaching link {name}: {error}"));
                }
                report.links.push(format!("{name} (link {id})"));
            }
            Err(error) => report
                .problems
                .push(format!("opening pinned link {}: {error}", path.display())),
        }
        if let Err(error) = std::fs::remove_file(&path) {
            report
                .problems
                .push(format!("removing {}: {error}", path.display()));
        }
    }
    for (name, path) in entries(&dir.maps()) {
        match std::fs::remove_file(&path) {
            Ok(()) => report.maps.push(name),
            Err(error) => report
                .problems
                .push(format!("removing {}: {error}", path.display())),
        }
    }
    dir.remove_empty();
    if root.exists() {
        report.problems.push(format!(
            "{} is not empty (something other than chaperone's pins is in it); left in place",
            root.display()
        ));
    }
    Ok(report)
}

/// `(file name, path)` of the entries of `dir`; none when it does not exist.
pub(crate) fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries: Vec<_> = read
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    entries.sort();
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmp_directory_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!on_bpffs(&dir.path().join("chaperone")));
        let error = PinDir::create(&dir.path().join("chaperone")).unwrap_err();
        assert!(error.to_string().contains("mount -t bpf"), "{error}");
    }

    /// Two node agents on one node (a surge pod beside a terminating one):
    /// neither may remove the pins while the other holds them; alone, it may.
    #[test]
    fn a_hold_is_exclusive_only_for_the_last_agent() {
        let dir = tempfile::tempdir().unwrap();
        let old = PinHold::take(dir.path()).unwrap().unwrap();
        let new = PinHold::take(dir.path()).unwrap().unwrap();
        assert!(!old.only_holder().unwrap(), "another agent holds the pins");
        drop(old);
        assert!(new.only_holder().unwrap(), "the last agent may remove them");
        let gone = dir.path().join("gone");
        assert!(PinHold::take(&gone).unwrap().is_none());
    }

    /// An agent starting while the pins are being removed waits, then sees
    /// the directory is gone and starts afresh instead of adopting nothing.
    #[test]
    fn a_hold_taken_during_removal_sees_the_directory_go() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("chaperone");
        std::fs::create_dir(&root).unwrap();
        let remover = PinHold::take(&root).unwrap().unwrap();
        assert!(remover.only_holder().unwrap());
        let starter = {
            let root = root.clone();
            std::thread::spawn(move || PinHold::take(&root).unwrap().is_none())
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::remove_dir(&root).unwrap();
        drop(remover);
        assert!(
            starter.join().unwrap(),
            "the hold is on a removed directory"
        );
    }

    #[test]
    fn detaching_nothing_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let report = detach_all(&dir.path().join("missing")).unwrap();
        assert!(report.links.is_empty() && report.maps.is_empty() && report.problems.is_empty());
    }

    /// `chaperone detach --bpffs DIR` pointed at an ordinary directory (a
    /// typo, a config directory) removes nothing and says why.
    #[test]
    fn an_ordinary_directory_is_never_emptied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::create_dir(dir.path().join("maps")).unwrap();
        std::fs::write(dir.path().join("maps").join("CONFIG"), "x").unwrap();
        let refusal = detach_all(dir.path()).unwrap_err();
        assert!(
            refusal.to_string().contains("not on a BPF filesystem"),
            "{refusal}"
        );
        assert!(dir.path().join("config.json").exists());
        assert!(dir.path().join("maps").join("CONFIG").exists());
        let file = dir.path().join("config.json");
        assert!(detach_all(&file).is_err(), "a file is not a pin directory");
        assert!(file.exists());
    }
}
