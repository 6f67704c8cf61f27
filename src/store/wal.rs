//! The write-ahead log in front of sled: one append and one `fdatasync` make
//! a group commit durable, where sled alone needs its flush (a `pwrite` and a
//! `sync_file_range`) *and* an `fdatasync`: two trips to the disk per ack
//! instead of one.
//!
//! The file is a run of frames, one per group commit:
//!
//! | bytes | what |
//! |---|---|
//! | 4 | payload length (u32, little endian) |
//! | 4 | CRC-32 of the payload |
//! | n | payload: entries |
//!
//! and an entry is `kind (u8) · id (u64 BE) · value length (u32 LE) · value ·
//! target count (u16 LE) · per target: length (u8) · name`, where the value
//! is the record exactly as sled stores it and the targets are those the
//! event was queued for. A frame that is cut short or fails its CRC ends the
//! log (a torn write at a crash): it was never acknowledged.
//!
//! The log is a run of segment files (`relay.wal.<sequence>`). A checkpoint
//! starts a new segment; once sled is flushed and fsynced with everything
//! the older segments hold, they are deleted, except one that is kept as the
//! spare (`relay.wal.spare`) the next segment is made from. A new segment
//! written over the spare's old bytes does not grow its file, so its
//! `fdatasync` has no size to record (measured: about a third faster than
//! appending). What follows the last frame in a segment is zeros or old
//! frames; old frames have ids at or below sled's highest id, which is
//! durable before they become spare, and entries at or below sled's highest
//! id are skipped on replay.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::crashpoint;

/// Segment files are named this, then a dot and their sequence number.
pub const FILE_PREFIX: &str = "relay.wal";

/// Where segment `seq` of the log in `dir` lives.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}.{seq:020}"))
}

/// The sequence numbers of the segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix(FILE_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|seq| seq.parse().ok())
        {
            found.push(seq);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The spare segment file's name. A file by this name is complete (full
/// size, synced) and never written again under it: the committer may take
/// it for its next segment at any moment (see [`Wal::create`]).
pub const SPARE_NAME: &str = "relay.wal.spare";

/// Where a spare is made: a retired segment, or a new file, is filled to
/// full size under this name, then renamed to [`SPARE_NAME`]. Only the
/// checkpoint writes it.
pub const SPARE_PREP_NAME: &str = "relay.wal.spare-prep";

/// Size a spare segment is made to before it is used.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Retires the segments up to and including `seq` (sled holds all of
/// them): one is kept to become the spare when there is none, the others
/// are deleted.
pub fn remove_through(dir: &Path, seq: u64) -> std::io::Result<()> {
    let spare = dir.join(SPARE_NAME);
    let prep = dir.join(SPARE_PREP_NAME);
    for old in segments(dir)?.into_iter().filter(|s| *s <= seq) {
        let path = segment_path(dir, old);
        let retired = if spare.exists() || prep.exists() {
            std::fs::remove_file(&path)
        } else {
            std::fs::rename(&path, &prep)
        };
        match retired {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

/// Makes sure a spare segment of at least [`SEGMENT_BYTES`] exists (written
/// with zeros once, then reused), so that the next segment starts full size.
/// It is filled under [`SPARE_PREP_NAME`] and only then named the spare:
/// filling the spare itself raced the committer, which may rename it into
/// its next segment and write frames there while the zeros still went in.
pub fn prepare_spare(dir: &Path) -> std::io::Result<()> {
    if dir.join(SPARE_NAME).exists() {
        return Ok(());
    }
    let path = dir.join(SPARE_PREP_NAME);
    // Only with room to spare: the spare is a speed-up, and filling a
    // nearly full disk with zeros would make commits fail meanwhile.
    if !path.exists() && crate::disk::available_space(dir)? < 4 * SEGMENT_BYTES {
        return Ok(());
    }
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let len = file.metadata()?.len();
    if len < SEGMENT_BYTES {
        file.seek(SeekFrom::Start(len))?;
        let zeros = vec![0u8; 1024 * 1024];
        let mut left = SEGMENT_BYTES - len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&path, dir.join(SPARE_NAME))?;
    File::open(dir)?.sync_all()
}

pub const KIND_EVENT: u8 = 1;
pub const KIND_QUARANTINE: u8 = 2;

const HEADER: usize = 8;

/// One entry read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: u8,
    pub id: u64,
    pub value: Vec<u8>,
    pub targets: Vec<String>,
}

/// Builds one frame from entries.
#[derive(Default)]
pub struct Frame {
    bytes: Vec<u8>,
}

impl Frame {
    pub fn new() -> Frame {
        Frame {
            bytes: vec![0; HEADER],
        }
    }

    pub fn push<'a>(
        &mut self,
        kind: u8,
        id: u64,
        value: &[u8],
        targets: impl IntoIterator<Item = &'a str>,
    ) {
        let b = &mut self.bytes;
        b.push(kind);
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&(value.len() as u32).to_le_bytes());
        b.extend_from_slice(value);
        let count_at = b.len();
        b.extend_from_slice(&0u16.to_le_bytes());
        let mut count = 0u16;
        for target in targets {
            // Target names are short ([a-z0-9_-]+, checked by the config).
            let name = &target.as_bytes()[..target.len().min(255)];
            b.push(name.len() as u8);
            b.extend_from_slice(name);
            count += 1;
        }
        b[count_at..count_at + 2].copy_from_slice(&count.to_le_bytes());
    }

    /// The finished frame's bytes, as they go to the file.
    pub fn to_bytes(mut self) -> Vec<u8> {
        self.seal();
        self.bytes
    }

    /// The finished frame: header filled in.
    fn seal(&mut self) -> &[u8] {
        let payload = &self.bytes[HEADER..];
        let len = (payload.len() as u32).to_le_bytes();
        let crc = crc32fast::hash(payload).to_le_bytes();
        self.bytes[..4].copy_from_slice(&len);
        self.bytes[4..8].copy_from_slice(&crc);
        &self.bytes
    }
}

/// The log's current segment, open for appending.
pub struct Wal {
    dir: PathBuf,
    seq: u64,
    file: File,
    len: u64,
    /// A failed append left bytes past `len` that could not be cut off
    /// yet: nothing is appended until they are (a frame after them would
    /// never be read back).
    torn: bool,
}

impl Wal {
    /// Reads back every whole frame of every segment in `dir` (a torn tail
    /// ends a segment), then starts a new segment after them. Returns the
    /// entries and the sequence number of the last old segment (0: none).
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Vec<Entry>, u64)> {
        let old = segments(dir)?;
        let mut entries = Vec::new();
        for seq in &old {
            let mut bytes = Vec::new();
            File::open(segment_path(dir, *seq))?.read_to_end(&mut bytes)?;
            entries.append(&mut read_frames(&bytes).0);
        }
        let last_old = old.last().copied().unwrap_or(0);
        let wal = Wal::create(dir, last_old + 1)?;
        Ok((wal, entries, last_old))
    }

    fn create(dir: &Path, seq: u64) -> std::io::Result<Wal> {
        let path = segment_path(dir, seq);
        let spare = dir.join(SPARE_NAME);
        let file = if spare.exists() {
            std::fs::rename(&spare, &path)?;
            // Written from the start, over the spare's old bytes.
            File::options().write(true).open(&path)?
        } else {
            File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?
        };
        // The new file's name must survive a power cut too.
        File::open(dir)?.sync_all()?;
        Ok(Wal {
            dir: dir.to_owned(),
            seq,
            file,
            len: 0,
            torn: false,
        })
    }

    /// Sequence number of the current segment.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Starts the next segment; returns the sequence number of the one
    /// before, which a checkpoint can then make redundant.
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        let next = Wal::create(&self.dir, self.seq + 1)?;
        let old = std::mem::replace(self, next);
        Ok(old.seq)
    }

    /// Bytes in the current segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `frame` and waits for `fdatasync`. On failure the file is cut
    /// back to where it was, so a later frame never follows a broken one.
    pub fn append(&mut self, frame: &mut Frame) -> std::io::Result<()> {
        if self.torn {
            self.cut_back()?;
        }
        let bytes = frame.seal();
        let mut injected = false;
        let written = if crashpoint::hits(crashpoint::COMMIT_TORN) {
            // Half a frame reaches the disk, then the process dies.
            let _ = self.file.write_all(&bytes[..bytes.len() / 2]);
            let _ = self.file.sync_data();
            crashpoint::crash(crashpoint::COMMIT_TORN)
        } else if crashpoint::fails(crashpoint::COMMIT_WRITE) {
            // A failing disk: half the frame is written, then an error, and
            // cutting it off fails too (this once).
            injected = true;
            let _ = self.file.write_all(&bytes[..bytes.len() / 2]);
            Err(std::io::Error::other("injected by LEADFLO_RELAY_FAIL_AT"))
        } else {
            self.file
                .write_all(bytes)
                .and_then(|()| self.file.sync_data())
        };
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(err) => {
                self.torn = true;
                if !injected {
                    let _ = self.cut_back();
                }
                Err(err)
            }
        }
    }

    /// Cuts the segment back to its last whole frame.
    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        self.torn = false;
        Ok(())
    }
}

/// Every entry of every whole frame, and the length of that valid prefix.
pub fn read_frames(bytes: &[u8]) -> (Vec<Entry>, u64) {
    let mut entries = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if len == 0 || crc32fast::hash(payload) != crc {
            break;
        }
        match parse_payload(payload) {
            Some(mut parsed) => entries.append(&mut parsed),
            None => break,
        }
        at += HEADER + len;
    }
    (entries, at as u64)
}

fn parse_payload(mut p: &[u8]) -> Option<Vec<Entry>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    let mut entries = Vec::new();
    while !p.is_empty() {
        let kind = take(&mut p, 1)?[0];
        let id = u64::from_be_bytes(take(&mut p, 8)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
        let value = take(&mut p, len)?.to_vec();
        let count = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?);
        let mut targets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let n = take(&mut p, 1)?[0] as usize;
            targets.push(String::from_utf8(take(&mut p, n)?.to_vec()).ok()?);
        }
        entries.push(Entry {
            kind,
            id,
            value,
            targets,
        });
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(entries: &[(u8, u64, &[u8], &[&str])]) -> Vec<u8> {
        let mut frame = Frame::new();
        for (kind, id, value, targets) in entries {
            frame.push(*kind, *id, value, targets.iter().copied());
        }
        frame.seal().to_vec()
    }

    #[test]
    fn frames_read_back_entry_for_entry() {
        let mut bytes = frame(&[
            (KIND_EVENT, 7, b"body one", &["crm", "slack"]),
            (KIND_QUARANTINE, 8, b"", &[]),
        ]);
        bytes.extend(frame(&[(KIND_EVENT, 9, "Zoë".as_bytes(), &["crm"])]));
        let (entries, valid) = read_frames(&bytes);
        assert_eq!(valid as usize, bytes.len());
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].targets, vec!["crm", "slack"]);
        assert_eq!(entries[1].value, b"");
        assert_eq!(entries[2].value, "Zoë".as_bytes());
        assert_eq!(entries[2].id, 9);
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_log_at_the_last_whole_frame() {
        let first = frame(&[(KIND_EVENT, 1, b"kept", &["crm"])]);
        let second = frame(&[(KIND_EVENT, 2, b"torn", &["crm"])]);
        for cut in 1..second.len() {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second[..cut]);
            let (entries, valid) = read_frames(&bytes);
            assert_eq!(valid as usize, first.len(), "cut at {cut}");
            assert_eq!(entries.len(), 1);
        }
        let mut bytes = first.clone();
        let mut flipped = second.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        bytes.extend(flipped);
        assert_eq!(read_frames(&bytes).1 as usize, first.len());
    }

    #[test]
    fn segments_read_back_in_order_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, entries, last_old) = Wal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        assert_eq!((last_old, wal.seq()), (0, 1));
        let mut f = Frame::new();
        f.push(KIND_EVENT, 1, b"one", ["crm"]);
        wal.append(&mut f).unwrap();
        assert_eq!(wal.rotate().unwrap(), 1);
        let mut f = Frame::new();
        f.push(KIND_EVENT, 2, b"two", ["crm"]);
        wal.append(&mut f).unwrap();
        drop(wal);
        // A torn frame at the end of the newest segment is ignored.
        let mut file = File::options()
            .append(true)
            .open(segment_path(dir.path(), 2))
            .unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let (wal, entries, last_old) = Wal::open(dir.path()).unwrap();
        assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((last_old, wal.seq()), (2, 3));
        remove_through(dir.path(), last_old).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![3]);
        // One retired segment is kept to become the spare, under another
        // name until it is full size: the committer never sees a spare that
        // is still being written (it may take it at any moment).
        let spare = dir.path().join(SPARE_NAME);
        let prep = dir.path().join(SPARE_PREP_NAME);
        assert!(!spare.exists() && prep.exists());
        prepare_spare(dir.path()).unwrap();
        assert!(!prep.exists());
        assert!(std::fs::metadata(&spare).unwrap().len() >= SEGMENT_BYTES);
        // The next segment is made from it, its old frames (ids 1 and 2)
        // still there after the new one, as replay expects.
        let mut wal = wal;
        let mut f = Frame::new();
        f.push(KIND_EVENT, 3, b"three", ["crm"]);
        wal.append(&mut f).unwrap();
        wal.rotate().unwrap();
        assert!(!dir.path().join(SPARE_NAME).exists());
        prepare_spare(dir.path()).unwrap();
        assert!(
            std::fs::metadata(dir.path().join(SPARE_NAME))
                .unwrap()
                .len()
                >= SEGMENT_BYTES
        );
    }
}
