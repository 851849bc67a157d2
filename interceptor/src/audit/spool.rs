//! The on-disk spool of one sink: append-only segment files of JSON lines
//! and a cursor of what the sink has acknowledged.
//!
//! ```text
//! <spool>/<sink>/00000000000000000007.seg   events, one JSON line each
//! <spool>/<sink>/00000000000000000008.seg   the segment being appended
//! <spool>/<sink>/cursor                     "7 18342": acknowledged up to here
//! ```
//!
//! Appends are written and `fdatasync`ed before the ingest moves on, so an
//! admitted event survives a crash of the process or the machine. The cursor
//! is rewritten (write + rename) after every acknowledged batch but not
//! synced: after a crash the sink may see the last batches again, never
//! fewer (at-least-once). Segments wholly behind the cursor are deleted.
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
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

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

struct State {
    write_seg: u64,
    write_file: File,
    write_len: u64,
    read_seg: u64,
    read_off: u64,
    /// The highest missing segment already logged.
    warned_missing: u64,
}

pub struct Spool {
    dir: PathBuf,
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
    /// Opens (or creates) the spool in `dir`, resuming after the last
    /// acknowledged event.
    pub fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<Self> {
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // Spooled events hold request and response bodies: owner-only.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
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
        let write_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, write_seg))?;
        let write_len = write_file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            segment_bytes,
            max_bytes,
            state: Mutex::new(State {
                write_seg,
                write_file,
                write_len,
                read_seg,
                read_off,
                warned_missing: 0,
            }),
            bytes: AtomicU64::new(bytes),
            events: AtomicU64::new(events),
            #[cfg(test)]
            reads: AtomicU64::new(0),
        })
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
        let mut state = self.lock();
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
        let mut state = self.lock();
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
        let mut state = self.lock();
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
