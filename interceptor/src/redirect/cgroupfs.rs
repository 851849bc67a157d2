//! cgroup v2: where it is mounted, and the id of a cgroup.
//!
//! On a unified host cgroup v2 is at `/sys/fs/cgroup`; on a hybrid host (v1
//! controllers plus a v2 hierarchy) it is usually `/sys/fs/cgroup/unified`.
//! Never assume: read `/proc/mounts`.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::addr::CgroupId;

#[derive(Debug, thiserror::Error)]
pub enum CgroupMountError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "no cgroup v2 filesystem is mounted (no `cgroup2` line in {0}); chaperone needs cgroup v2: \
         boot with systemd.unified_cgroup_hierarchy=1, or mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NotMounted(PathBuf),
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupMountError> {
    let path = Path::new("/proc/mounts");
    let mounts = fs::read_to_string(path).map_err(|source| CgroupMountError::Read {
        path: path.into(),
        source,
    })?;
    find_cgroup2_mount(&mounts).ok_or_else(|| CgroupMountError::NotMounted(path.into()))
}

/// The first `cgroup2` mount point in a `/proc/mounts` text.
pub fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// The cgroup v2 hierarchy at `root`: `root` itself when a cgroup2
/// filesystem is mounted there, or `root/unified` when that is one. A
/// hybrid host's `/sys/fs/cgroup` (a tmpfs of v1 controllers with cgroup
/// v2 at `unified`) mounted whole into the node agent's container, as the
/// DaemonSet mounts it at `/host/sys/fs/cgroup`, has its v2 hierarchy one
/// level down; attaching at the tmpfs would fail. Anything else: `root`
/// unchanged (the attach then says what is wrong with it).
pub fn cgroup2_root_at(root: &Path) -> PathBuf {
    fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| find_cgroup2_root_at(&mounts, root))
        .unwrap_or_else(|| root.to_path_buf())
}

/// [`cgroup2_root_at`] over a `/proc/mounts` text.
pub fn find_cgroup2_root_at(mounts: &str, root: &Path) -> Option<PathBuf> {
    let cgroup2: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
        })
        .collect();
    [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|candidate| cgroup2.contains(candidate))
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for processes inside it.
pub fn cgroup_id(dir: &Path) -> io::Result<CgroupId> {
    Ok(CgroupId(fs::metadata(dir)?.ino()))
}

/// This process's own cgroup v2 and every cgroup above it up to the
/// mount, from `/proc/self/cgroup`: what chaperone must never guard, or its
/// own connections would be redirected into itself.
pub fn own_lineage() -> io::Result<Vec<CgroupId>> {
    let mount = cgroup2_mount().map_err(io::Error::other)?;
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let relative = own_cgroup_path(&text)
        .ok_or_else(|| io::Error::other("no cgroup v2 (`0::`) line in /proc/self/cgroup"))?;
    let mut dir = mount.join(relative.trim_start_matches('/'));
    let mut lineage = Vec::new();
    loop {
        if let Ok(id) = cgroup_id(&dir) {
            lineage.push(id);
        }
        if dir == mount || !dir.pop() || !dir.starts_with(&mount) {
            break;
        }
    }
    Ok(lineage)
}

/// The cgroup v2 path in a `/proc/PID/cgroup` text (the `0::PATH` line).
fn own_cgroup_path(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_hosts_cgroup_tree_mounted_whole_resolves_to_its_v2_hierarchy() {
        // The node agent's container on a hybrid node: the DaemonSet's
        // hostPath /sys/fs/cgroup at /host/sys/fs/cgroup, submounts included.
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
tmpfs /host/sys/fs/cgroup tmpfs ro,relatime 0 0
cgroup /host/sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /host/sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        assert_eq!(
            find_cgroup2_root_at(mounts, Path::new("/host/sys/fs/cgroup")),
            Some(PathBuf::from("/host/sys/fs/cgroup/unified"))
        );
        // A unified node: the configured root is the hierarchy itself.
        let unified = "cgroup2 /host/sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_root_at(unified, Path::new("/host/sys/fs/cgroup")),
            Some(PathBuf::from("/host/sys/fs/cgroup"))
        );
        // Nothing cgroup2 there: no guess.
        assert_eq!(find_cgroup2_root_at(mounts, Path::new("/host/proc")), None);
    }

    #[test]
    fn hybrid_layout_finds_the_unified_mount() {
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_layout_finds_the_root_mount() {
        let mounts =
            "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_has_no_mount() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(find_cgroup2_mount(mounts), None);
    }

    #[test]
    fn a_cgroup_filesystem_named_cgroup2_is_not_mistaken_for_one() {
        // The first field is the source, which anyone can name "cgroup2".
        let mounts = "cgroup2 /mnt/fake tmpfs rw 0 0\nnone /run/cg2 cgroup2 rw 0 0\n";
        assert_eq!(find_cgroup2_mount(mounts), Some(PathBuf::from("/run/cg2")));
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let mounts = "cgroup2 /run/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/run/my cgroups"))
        );
    }

    #[test]
    fn this_machines_mount_is_found_when_it_has_one() {
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        if mounts.contains(" cgroup2 ") {
            let found = cgroup2_mount().unwrap();
            assert!(
                found.join("cgroup.procs").exists(),
                "{found:?} is not a cgroup2 root"
            );
        }
    }

    #[test]
    fn the_own_cgroup_is_the_v2_line() {
        let text = "12:cpu,cpuacct:/kubepods/x\n0::/kubepods.slice/chaperone.scope\n";
        assert_eq!(
            own_cgroup_path(text),
            Some("/kubepods.slice/chaperone.scope")
        );
        assert_eq!(own_cgroup_path("3:memory:/x\n"), None);
        if let Ok(lineage) = own_lineage() {
            let mount = cgroup2_mount().unwrap();
            assert_eq!(lineage.last(), Some(&cgroup_id(&mount).unwrap()));
        }
    }

    #[test]
    fn cgroup_id_is_the_directory_inode() {
        let dir = tempfile::tempdir().unwrap();
        let id = cgroup_id(dir.path()).unwrap();
        assert_eq!(id.0, fs::metadata(dir.path()).unwrap().ino());
    }
}
