//! The on-disk spool of one sink: append-only segment files of JSON lines
//! and a cursor of what the sink has acknowledged, owned by one process at
//! a time.
//!
//! ```text
//! <spool>/<sink>/lock                         flock(LOCK_EX) of the process spooling here
//! <spool>/<sink>/00000000000000000007.seg     events, one JSON line each
//! <spool>/<sink>/00000000000000000008.seg     the segment being appended
//! <spool>/<sink>/cursor                       "7 18342": acknowledged up to here
//! <spool>/<sink>/surge-1/{lock,*.seg,cursor}  the spool of a second process
//! ```
//!
//! Appends are written and `fdatasync`ed before the ingest moves on, so an
//! admitted event survives a crash of the process or the machine. The cursor
//! is rewritten (write + rename) after every acknowledged batch but not
//! synced: after a crash the sink may see the last batches again, never
//! fewer (at-least-once). Segments wholly behind the cursor are deleted.
//!
//! # One process per directory
//!
//! A spool directory is used by the process holding `flock(LOCK_EX)` on its
//! `lock` file, for the [`Spool`]'s lifetime or until [`Spool::close`]
//! (two processes appending and
//! acknowledging by their own in-memory cursors would delete each other's
//! segments). The lock is per open file description, so two [`Spool::open`]
//! in one process exclude each other too, and the kernel drops it when the
//! process dies: a crashed agent leaves no stale lock.
//!
//! When the sink's directory is held (during a rolling update the new node
//! agent runs beside the old one, on the same hostPath), [`Spool::open`]
//! takes the first free numbered slot `surge-<n>/` inside it instead, so the
//! new process spools at once and losslessly. Slots are numbered rather than
//! named by pid: a freed slot is reused, so their count stays bounded.
//!
//! A spool whose lock nobody holds is an orphan: its process exited with
//! events not yet delivered. [`Spool::adopt_orphans`] (run by the delivery
//! loop at start and periodically) moves every orphan of the same sink (the
//! sink's directory itself, or a `surge-<n>/` slot) into the caller's spool:
//! each batch of its unacknowledged events is appended and synced here,
//! then acknowledged there. A crash in between delivers that batch twice,
//! never loses it. Adoption pauses while the caller's spool is full (the
//! rest waits in the orphan). A drained slot is removed; the sink's
//! directory stays (empty) for the next process.
//!
//! A directory written by a version without the lock (segments and a
//! cursor, no `lock` file) is resumed as before: the lock file is created.
//! Such a version ignores `lock` and the slots; but it does not take the
//! lock either, so it is not kept out of a directory a new version holds.
//!
//! # A missing segment
//!
//! Segments are only deleted behind the cursor; one missing between the
//! cursor and the segment being appended was removed by something else (an
//! operator, or an older agent sharing the directory). [`Spool::read`] logs
//! it once, skips it (its events are gone) and reads on from the next; when
//! it is the segment being appended, appends continue in a new one. The
//! event counters are resynced whenever a read reaches the end, so they never
//! count events that are no longer on disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file of a spool directory.
const LOCK: &str = "lock";
/// Prefix of the numbered slots a second process spools in.
const SURGE: &str = "surge-";
/// More processes than this on one spool at once is a bug, not a surge.
const MAX_SURGE_SLOTS: u32 = 64;
/// Events moved from an orphan per append (and sync).
const ADOPT_BATCH: usize = 1024;

/// Events read from the spool, not yet acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Vec<u8>>,
    bytes: u64,
    end: (u64, u64),
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// What one [`Spool::adopt_orphans`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adoption {
    /// Orphaned spools drained.
    pub spools: usize,
    /// Events moved into this spool.
    pub events: u64,
    /// An orphan still holds events because this spool filled up (or the
    /// pass was stopped): try again once there is room. (An orphan that
    /// cannot be read is logged and tried again at the next pass.)
    pub full: bool,
}

struct State {
    write_seg: u64,
    write_file: File,
    write_len: u64,
    read_seg: u64,
    read_off: u64,
    /// The highest missing segment already logged.
    warned_missing: u64,
    /// The directory's lock, held until [`Spool::close`] or drop.
    lock: Option<Flock<File>>,
}

pub struct Spool {
    dir: PathBuf,
    /// The sink's directory: `dir` itself, or the parent of its surge slot.
    home: PathBuf,
    segment_bytes: u64,
    pub(crate) max_bytes: u64,
    state: Mutex<State>,
    bytes: AtomicU64,
    events: AtomicU64,
    /// Calls of [`Spool::read`]: a delivery loop that spins shows here.
    #[cfg(test)]
    pub(crate) reads: AtomicU64,
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:020}.seg"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn create_dir(dir: &Path) -> io::Result<()> {
    // Spooled events hold request and response bodies: owner-only.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Takes `dir`'s lock without waiting: `None` when another open spool holds
/// it (or, with `create` false, when `dir` is gone). With `create`, makes
/// `dir` first.
fn try_lock(dir: &Path, create: bool) -> io::Result<Option<Flock<File>>> {
    let path = dir.join(LOCK);
    for _ in 0..8 {
        if create {
            create_dir(dir)?;
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => file,
            // Removed with its drained slot meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(errno.into()),
        };
        // The adopter of a slot removes its lock file while holding it: a
        // lock on a file no longer at `path` holds nothing.
        let held = lock.metadata()?;
        match fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                return Ok(Some(lock));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            _ => continue,
        }
    }
    Err(io::Error::other(format!(
        "{} keeps being replaced while it is locked",
        path.display()
    )))
}

/// A crash in the middle of an append can leave a partial last line; new
/// appends would glue onto it. Cut it off (it was never acknowledged to the
/// data path as written: the append had not returned).
fn repair_tail(path: &Path) -> io::Result<()> {
    let data = fs::read(path)?;
    if data.last().is_none_or(|b| *b == b'\n') {
        return Ok(());
    }
    let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        segment = %path.display(),
        bytes = data.len() - keep,
        "cutting a partial audit event left by an interrupted write"
    );
    OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(keep as u64)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Spool {
    /// Opens (or creates) the spool of the sink directory `dir`, resuming
    /// after the last acknowledged event. When another process (or another
    /// open `Spool`) holds `dir`, uses a `surge-<n>/` slot inside it instead:
    /// see [`Spool::dir`].
    pub fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<Self> {
        if let Some(lock) = try_lock(dir, true)? {
            return Self::open_locked(dir, dir, lock, max_bytes, segment_bytes);
        }
        for n in 1..=MAX_SURGE_SLOTS {
            let slot = dir.join(format!("{SURGE}{n}"));
            if let Some(lock) = try_lock(&slot, true)? {
                tracing::info!(
                    spool = %dir.display(),
                    slot = %slot.display(),
                    "the audit spool is held by another process (a node agent being replaced?): \
                     spooling in a slot of its own; its events are adopted once it exits"
                );
                return Self::open_locked(&slot, dir, lock, max_bytes, segment_bytes);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} and its {MAX_SURGE_SLOTS} surge slots are all held by other processes",
                dir.display()
            ),
        ))
    }

    /// Opens the spool in `dir`, whose lock the caller holds.
    fn open_locked(
        dir: &Path,
        home: &Path,
        lock: Flock<File>,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> io::Result<Self> {
        let (mut read_seg, mut read_off) = match fs::read_to_string(dir.join("cursor")) {
            Ok(text) => {
                let mut parts = text.split_whitespace().map(str::parse::<u64>);
                match (parts.next(), parts.next()) {
                    (Some(Ok(seg)), Some(Ok(off))) => (seg, off),
                    _ => (0, 0),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e),
        };
        let mut segs = segments(dir)?;
        for seg in segs.iter().filter(|s| **s < read_seg) {
            fs::remove_file(segment_path(dir, *seg))?;
        }
        segs.retain(|s| *s >= read_seg);
        if segs.first().is_some_and(|first| *first > read_seg) {
            // The cursor's segment is gone: start at the oldest one left.
            read_seg = segs[0];
            read_off = 0;
        }
        let write_seg = match segs.last() {
            Some(last) => *last,
            None => {
                let seg = read_seg.max(1);
                read_seg = seg;
                read_off = 0;
                seg
            }
        };
        if segs.is_empty() {
            File::create(segment_path(dir, write_seg))?;
        }
        repair_tail(&segment_path(dir, write_seg))?;
        let mut bytes = 0u64;
        let mut events = 0u64;
        for seg in read_seg..=write_seg {
            let path = segment_path(dir, seg);
            let Ok(mut file) = File::open(&path) else {
                continue;
            };
            if seg == read_seg {
                file.seek(SeekFrom::Start(read_off))?;
            }
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            bytes += data.len() as u64;
            events += data.iter().filter(|b| **b == b'\n').count() as u64;
        }
        let write_file = open_append(&segment_path(dir, write_seg))?;
        let write_len = write_file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            home: home.to_owned(),
            segment_bytes,
            max_bytes,
            state: Mutex::new(State {
                write_seg,
                write_file,
                write_len,
                read_seg,
                read_off,
                warned_missing: 0,
                lock: Some(lock),
            }),
            bytes: AtomicU64::new(bytes),
            events: AtomicU64::new(events),
            #[cfg(test)]
            reads: AtomicU64::new(0),
        })
    }

    /// The directory this spool writes: the sink's directory, or a
    /// `surge-<n>/` slot in it when another process holds that.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of unacknowledged events.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Unacknowledged events.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, while this spool still owns its directory.
    fn owned(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        let state = self.lock();
        if state.lock.is_none() {
            return Err(io::Error::other(format!(
                "the audit spool {} was closed",
                self.dir.display()
            )));
        }
        Ok(state)
    }

    /// Gives the directory up for the next process (or the next
    /// [`Spool::open`]) before the spool is dropped: what is not delivered
    /// stays in it. Appends, reads and acks fail from now on.
    pub fn close(&self) {
        self.lock().lock = None;
    }

    /// Continues in a new segment after `state.write_seg`.
    fn roll(&self, state: &mut State) -> io::Result<()> {
        let next = state.write_seg + 1;
        state.write_file = open_append(&segment_path(&self.dir, next))?;
        state.write_seg = next;
        state.write_len = 0;
        Ok(())
    }

    /// Logs (once per segment) that `seg` is missing.
    fn missing(&self, state: &mut State, seg: u64) {
        if seg > state.warned_missing {
            state.warned_missing = seg;
            tracing::warn!(
                segment = %segment_path(&self.dir, seg).display(),
                "an audit spool segment was removed before its events were delivered: \
                 they are lost; reading on from the next segment"
            );
        }
    }

    /// Appends events (each one JSON line without newline) and syncs them.
    pub fn append(&self, lines: &[&[u8]]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut state = self.owned()?;
        if state.write_file.metadata()?.nlink() == 0 {
            // Something removed the segment being appended: what is written
            // to it now would be lost with it.
            let seg = state.write_seg;
            self.missing(&mut state, seg);
            self.roll(&mut state)?;
        }
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            buf.extend_from_slice(line);
            buf.push(b'\n');
        }
        state.write_file.write_all(&buf)?;
        state.write_file.sync_data()?;
        state.write_len += buf.len() as u64;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.events.fetch_add(lines.len() as u64, Ordering::Relaxed);
        if state.write_len >= self.segment_bytes {
            self.roll(&mut state)?;
        }
        Ok(())
    }

    /// Reads up to `max` unacknowledged events, oldest first. A missing
    /// segment is skipped (logged once): its events are gone.
    pub fn read(&self, max: usize) -> io::Result<Batch> {
        #[cfg(test)]
        self.reads.fetch_add(1, Ordering::Relaxed);
        let mut state = self.owned()?;
        let mut batch = Batch {
            end: (state.read_seg, state.read_off),
            ..Batch::default()
        };
        let (mut seg, mut off) = (state.read_seg, state.read_off);
        loop {
            let mut data = Vec::new();
            match File::open(segment_path(&self.dir, seg)) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(off))?;
                    file.read_to_end(&mut data)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.missing(&mut state, seg);
                    if seg == state.write_seg {
                        // Appends go on in a file that exists.
                        self.roll(&mut state)?;
                    }
                }
                Err(e) => return Err(e),
            }
            let mut start = 0usize;
            while batch.events.len() < max {
                let Some(nl) = data[start..].iter().position(|b| *b == b'\n') else {
                    break;
                };
                batch.events.push(data[start..start + nl].to_vec());
                batch.bytes += nl as u64 + 1;
                start += nl + 1;
            }
            off += start as u64;
            batch.end = (seg, off);
            if batch.events.len() >= max {
                break;
            }
            if seg >= state.write_seg {
                // Every unacknowledged event is in this batch: the counters
                // say so, even if events were lost with a missing segment.
                self.events
                    .store(batch.events.len() as u64, Ordering::Relaxed);
                self.bytes.store(batch.bytes, Ordering::Relaxed);
                break;
            }
            // The rest of this segment is consumed: on to the next.
            seg += 1;
            off = 0;
            batch.end = (seg, 0);
        }
        if batch.is_empty() && batch.end != (state.read_seg, state.read_off) {
            // Nothing to deliver before `end` (consumed or missing
            // segments): move the cursor past them now, so they are neither
            // read nor logged again.
            self.advance(&mut state, &batch)?;
        }
        Ok(batch)
    }

    /// Marks `batch` delivered: moves the cursor and deletes consumed
    /// segments.
    pub fn ack(&self, batch: &Batch) -> io::Result<()> {
        let mut state = self.owned()?;
        self.advance(&mut state, batch)
    }

    fn advance(&self, state: &mut State, batch: &Batch) -> io::Result<()> {
        let old = state.read_seg;
        (state.read_seg, state.read_off) = batch.end;
        self.bytes.fetch_sub(
            batch.bytes.min(self.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.events.fetch_sub(
            (batch.events.len() as u64).min(self.events.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        let tmp = self.dir.join("cursor.tmp");
        fs::write(&tmp, format!("{} {}\n", state.read_seg, state.read_off))?;
        fs::rename(&tmp, self.dir.join("cursor"))?;
        for seg in old..state.read_seg {
            match fs::remove_file(segment_path(&self.dir, seg)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves the unacknowledged events of every orphaned spool of the same
    /// sink (its directory or a surge slot, whose lock nobody holds) into
    /// this one, and removes the drained slots. Stops early when this spool
    /// is full or `stop` says so (the rest stays where it is, for the next
    /// pass). Errors are logged per orphan.
    pub fn adopt_orphans(&self, stop: impl Fn() -> bool) -> Adoption {
        let mut adoption = Adoption::default();
        let candidates = match self.orphan_candidates() {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::warn!(%error, spool = %self.home.display(), "cannot look for orphaned audit spools");
                return adoption;
            }
        };
        for dir in candidates {
            let lock = match try_lock(&dir, false) {
                Ok(Some(lock)) => lock,
                // Another live process's spool.
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, spool = %dir.display(), "cannot lock an orphaned audit spool");
                    continue;
                }
            };
            match self.adopt(&dir, lock, &stop) {
                Ok((events, drained)) => {
                    adoption.events += events;
                    if drained {
                        adoption.spools += 1;
                    } else {
                        adoption.full = true;
                    }
                    if events > 0 {
                        tracing::info!(
                            spool = %dir.display(),
                            into = %self.dir.display(),
                            events,
                            drained,
                            "adopted the audit events a previous process left undelivered"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, spool = %dir.display(), into = %self.dir.display(), "cannot adopt an orphaned audit spool; will retry");
                }
            }
            if adoption.full || stop() {
                break;
            }
        }
        adoption
    }

    /// The other spool directories of this sink.
    fn orphan_candidates(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        if self.home != self.dir {
            out.push(self.home.clone());
        }
        for entry in fs::read_dir(&self.home)? {
            let entry = entry?;
            let name = entry.file_name();
            let is_slot = name
                .to_str()
                .and_then(|n| n.strip_prefix(SURGE))
                .is_some_and(|n| n.parse::<u32>().is_ok());
            let path = entry.path();
            if is_slot && path != self.dir && entry.file_type()?.is_dir() {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Drains the orphan in `dir` (locked by `lock`) into this spool:
    /// `(events moved, drained)`.
    fn adopt(
        &self,
        dir: &Path,
        lock: Flock<File>,
        stop: &impl Fn() -> bool,
    ) -> io::Result<(u64, bool)> {
        let orphan = Spool::open_locked(dir, &self.home, lock, u64::MAX, self.segment_bytes)?;
        let mut moved = 0u64;
        loop {
            if stop() {
                return Ok((moved, false));
            }
            let batch = orphan.read(ADOPT_BATCH)?;
            if batch.is_empty() {
                break;
            }
            if self.is_full() {
                return Ok((moved, false));
            }
            let lines: Vec<&[u8]> = batch.events.iter().map(Vec::as_slice).collect();
            // Synced here before it is acknowledged there.
            self.append(&lines)?;
            orphan.ack(&batch)?;
            moved += batch.events.len() as u64;
        }
        if dir != self.home {
            orphan.remove_slot()?;
        }
        Ok((moved, true))
    }

    /// Removes a drained surge slot. Its lock file goes last, while still
    /// held: a process that opens the slot meanwhile either finds it locked
    /// (and takes another) or, once the file is gone, starts afresh.
    fn remove_slot(self) -> io::Result<()> {
        for seg in segments(&self.dir)? {
            fs::remove_file(segment_path(&self.dir, seg))?;
        }
        for name in ["cursor", "cursor.tmp", LOCK] {
            match fs::remove_file(self.dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let dir = self.dir.clone();
        drop(self);
        // Not empty: a process took the slot again meanwhile, or left
        // something we do not know in it. Either way, not ours to remove.
        let _ = fs::remove_dir(&dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_reopening_and_acked_ones_are_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), 1 << 20, 64).unwrap();
        let lines: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
        spool.append(&refs).unwrap();
        spool.append(&refs[..5]).unwrap();
        assert_eq!(spool.events(), 25);
        assert!(segments(tmp.path()).unwrap().len() >= 2);
        let batch = spool.read(7).unwrap();
        assert_eq!(batch.events, lines[..7].to_vec());
        spool.ack(&batch).unwrap();
        assert_eq!(spool.events(), 18);
        drop(spool);

        let spool = Spool::open(tmp.path(), 1 << 20, 64).unwrap();
        assert_eq!(spool.events(), 18);
        let batch = spool.read(100).unwrap();
        assert_eq!(batch.events.len(), 18);
        assert_eq!(batch.events[0], lines[7]);
        assert_eq!(batch.events[17], lines[4]);
        spool.ack(&batch).unwrap();
        assert_eq!((spool.events(), spool.bytes()), (0, 0));
        assert!(spool.read(10).unwrap().is_empty());
        assert_eq!(
            segments(tmp.path()).unwrap().len(),
            1,
            "consumed segments are deleted"
        );
        spool.append(&refs[..1]).unwrap();
        assert_eq!(spool.read(10).unwrap().events, lines[..1].to_vec());
    }

    #[test]
    fn a_partial_line_from_a_crash_is_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(&[b"{\"n\":1}"]).unwrap();
        drop(spool);
        let seg = segment_path(tmp.path(), segments(tmp.path()).unwrap()[0]);
        let mut file = OpenOptions::new().append(true).open(&seg).unwrap();
        file.write_all(b"{\"n\":2, \"cut").unwrap();
        drop(file);
        let spool = Spool::open(tmp.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(&[b"{\"n\":3}"]).unwrap();
        let batch = spool.read(10).unwrap();
        assert_eq!(
            batch.events,
            vec![b"{\"n\":1}".to_vec(), b"{\"n\":3}".to_vec()]
        );
        assert_eq!(spool.events(), 2);
    }

    fn lines(prefix: &str, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{{\"{prefix}\":{i}}}").into_bytes())
            .collect()
    }

    fn append_each(spool: &Spool, lines: &[Vec<u8>]) {
        for line in lines {
            spool.append(&[line.as_slice()]).unwrap();
        }
    }

    /// Reads and acknowledges everything, in batches of `max`; fails if
    /// that takes more than `limit` reads (a read that does not move on).
    fn drain(spool: &Spool, max: usize, limit: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for _ in 0..limit {
            let batch = spool.read(max).unwrap();
            if batch.is_empty() {
                return out;
            }
            spool.ack(&batch).unwrap();
            out.extend(batch.events);
        }
        panic!("the spool was not drained in {limit} reads");
    }

    fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        v.sort();
        v
    }

    #[derive(Clone, Default)]
    struct Logs(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture<T>(&self, f: impl FnOnce() -> T) -> T {
            let writer = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, f)
        }

        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn a_held_spool_sends_the_next_open_to_a_slot_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("webhook");
        // What a version without the lock left: a segment and a cursor.
        fs::create_dir(&home).unwrap();
        fs::write(
            segment_path(&home, 3),
            "{\"old\":0}\n{\"old\":1}\n{\"old\":2}\n",
        )
        .unwrap();
        fs::write(home.join("cursor"), "3 10\n").unwrap();

        let first = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(first.dir(), home, "the old layout is resumed in place");
        assert_eq!(first.events(), 2);
        assert!(home.join(LOCK).is_file());

        // flock is per open file description: a second open in the same
        // process conflicts like another process would.
        let second = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(second.dir(), home.join("surge-1"));
        let third = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(third.dir(), home.join("surge-2"));
        assert!(try_lock(&home, false).unwrap().is_none());
        assert!(try_lock(&home.join("surge-1"), false).unwrap().is_none());

        second.append(&[b"{\"second\":0}"]).unwrap();
        first.append(&[b"{\"first\":0}"]).unwrap();
        assert_eq!(
            drain(&first, 10, 10),
            vec![
                b"{\"old\":1}".to_vec(),
                b"{\"old\":2}".to_vec(),
                b"{\"first\":0}".to_vec()
            ],
            "each spool reads only its own events"
        );
        assert_eq!(second.events(), 1);

        // A freed slot is taken again, with what was left in it.
        drop(second);
        let again = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(again.dir(), home.join("surge-1"));
        assert_eq!(drain(&again, 10, 10), vec![b"{\"second\":0}".to_vec()]);
        drop(third);

        // Closed (the audit thread has stopped), a spool gives its directory
        // up before it is dropped.
        first.close();
        assert!(first.append(&[b"{\"first\":1}"]).is_err());
        let next = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(next.dir(), home);
    }

    #[test]
    fn the_spool_of_an_exited_process_is_adopted_losslessly() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("webhook");
        let old = Spool::open(&home, 1 << 20, 64).unwrap();
        let new = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(new.dir(), home.join("surge-1"));
        let old_lines = lines("old", 20);
        let new_lines = lines("new", 10);
        append_each(&old, &old_lines);
        let batch = old.read(5).unwrap();
        old.ack(&batch).unwrap();
        append_each(&new, &new_lines);
        assert!(segments(&home).unwrap().len() >= 2);

        assert_eq!(
            new.adopt_orphans(|| false),
            Adoption::default(),
            "a live process's spool is not touched"
        );
        assert_eq!(old.events(), 15);

        drop(old);
        let adoption = new.adopt_orphans(|| false);
        assert_eq!(
            adoption,
            Adoption {
                spools: 1,
                events: 15,
                full: false
            }
        );
        assert_eq!(new.events(), 25);
        let mut expected = old_lines[5..].to_vec();
        expected.extend(new_lines.iter().cloned());
        assert_eq!(sorted(drain(&new, 7, 20)), sorted(expected));
        assert_eq!(new.adopt_orphans(|| false).events, 0, "adopted once");

        // The sink's directory stays, empty, for the next process.
        let next = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(next.dir(), home);
        assert_eq!(next.events(), 0);

        // And the process in the sink's directory adopts a slot, which goes.
        new.append(&[b"{\"new\":99}"]).unwrap();
        drop(new);
        assert_eq!(next.adopt_orphans(|| false).events, 1);
        assert!(!home.join("surge-1").exists(), "a drained slot is removed");
        assert_eq!(drain(&next, 10, 10), vec![b"{\"new\":99}".to_vec()]);
        let slot = Spool::open(&home, 1 << 20, 64).unwrap();
        assert_eq!(
            slot.dir(),
            home.join("surge-1"),
            "a removed slot is made again"
        );
        assert_eq!(slot.events(), 0);
    }

    #[test]
    fn adoption_stops_while_this_spool_is_full() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("webhook");
        let old = Spool::open(&home, 1 << 20, 1 << 20).unwrap();
        let new = Spool::open(&home, 1, 1 << 20).unwrap();
        append_each(&old, &lines("old", 3));
        new.append(&[b"{\"new\":0}"]).unwrap();
        drop(old);
        let adoption = new.adopt_orphans(|| false);
        assert_eq!((adoption.events, adoption.full), (0, true));
        drain(&new, 10, 10);
        let adoption = new.adopt_orphans(|| false);
        assert_eq!((adoption.events, adoption.full), (3, false));
    }

    #[test]
    fn a_missing_segment_is_skipped_logged_once_and_not_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), 1 << 20, 64).unwrap();
        let all = lines("n", 40);
        append_each(&spool, &all);
        let segs = segments(tmp.path()).unwrap();
        assert!(segs.len() >= 4, "{segs:?}");
        // A middle segment, and the one the cursor is in, go.
        let middle = segment_path(tmp.path(), segs[2]);
        let gone: Vec<Vec<u8>> = [segment_path(tmp.path(), segs[0]), middle.clone()]
            .iter()
            .flat_map(|path| {
                let text = fs::read_to_string(path).unwrap();
                fs::remove_file(path).unwrap();
                text.lines()
                    .map(|l| l.as_bytes().to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(!gone.is_empty());
        let expected: Vec<Vec<u8>> = all.iter().filter(|l| !gone.contains(l)).cloned().collect();

        let logs = Logs::default();
        let read = logs.capture(|| drain(&spool, 3, 100));
        assert_eq!(read, expected, "every event not in a removed segment");
        assert_eq!(
            (spool.events(), spool.bytes()),
            (0, 0),
            "events lost with a segment are not counted as waiting"
        );
        logs.capture(|| assert!(spool.read(10).unwrap().is_empty()));
        let text = logs.text();
        let name = middle.file_name().unwrap().to_str().unwrap();
        assert_eq!(text.matches(name).count(), 1, "logged once: {text}");
        assert!(text.contains("they are lost"), "{text}");

        spool.append(&[b"{\"after\":0}"]).unwrap();
        assert_eq!(drain(&spool, 10, 10), vec![b"{\"after\":0}".to_vec()]);
    }

    #[test]
    fn appends_go_on_when_the_segment_being_appended_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(&[b"{\"n\":0}"]).unwrap();
        let segs = segments(tmp.path()).unwrap();
        fs::remove_file(segment_path(tmp.path(), segs[0])).unwrap();
        spool.append(&[b"{\"n\":1}", b"{\"n\":2}"]).unwrap();
        assert_eq!(
            drain(&spool, 10, 10),
            vec![b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()]
        );
        assert_eq!(spool.events(), 0);

        // Removed after the append: the read notices, and appends move on.
        let segs = segments(tmp.path()).unwrap();
        spool.append(&[b"{\"n\":3}"]).unwrap();
        fs::remove_file(segment_path(tmp.path(), *segs.last().unwrap())).unwrap();
        assert_eq!(spool.events(), 1);
        assert!(spool.read(10).unwrap().is_empty());
        assert_eq!(spool.events(), 0, "resynced");
        spool.append(&[b"{\"n\":4}"]).unwrap();
        assert_eq!(drain(&spool, 10, 10), vec![b"{\"n\":4}".to_vec()]);
        drop(spool);
        let spool = Spool::open(tmp.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(spool.events(), 0);
    }
}
