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
//! A checkpoint (sled flushed and fsynced) empties the file; entries at or
//! below sled's highest id are already in sled and are skipped on replay.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::crashpoint;

/// The log's file name inside the data directory.
pub const FILE_NAME: &str = "relay.wal";

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

/// The open log file, positioned at its end.
pub struct Wal {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and reads back every whole frame;
    /// a torn tail is cut off.
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Vec<Entry>)> {
        let path = dir.join(FILE_NAME);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (entries, valid) = read_frames(&bytes);
        if valid as usize != bytes.len() {
            file.set_len(valid)?;
            file.sync_data()?;
        }
        file.seek(SeekFrom::Start(valid))?;
        Ok((
            Wal {
                file,
                path,
                len: valid,
            },
            entries,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log since the last checkpoint.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `frame` and waits for `fdatasync`. On failure the file is cut
    /// back to where it was, so a later frame never follows a broken one.
    pub fn append(&mut self, frame: &mut Frame) -> std::io::Result<()> {
        let bytes = frame.seal();
        let written = if crashpoint::hits(crashpoint::COMMIT_TORN) {
            // Half a frame reaches the disk, then the process dies.
            let _ = self.file.write_all(&bytes[..bytes.len() / 2]);
            let _ = self.file.sync_data();
            crashpoint::crash(crashpoint::COMMIT_TORN)
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
                let _ = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop));
                Err(err)
            }
        }
    }

    /// Empties the log: everything in it is durable in sled.
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_data()?;
        self.len = 0;
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
    fn append_reset_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, entries) = Wal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        let mut f = Frame::new();
        f.push(KIND_EVENT, 1, b"one", ["crm"]);
        wal.append(&mut f).unwrap();
        drop(wal);
        // A torn frame after the whole one is cut off at open.
        let path = dir.path().join(FILE_NAME);
        let mut file = File::options().append(true).open(&path).unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let (mut wal, entries) = Wal::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 1);
        let mut f = Frame::new();
        f.push(KIND_EVENT, 2, b"two", ["crm"]);
        wal.append(&mut f).unwrap();
        drop(wal);
        let (mut wal, entries) = Wal::open(dir.path()).unwrap();
        assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
        wal.reset().unwrap();
        drop(wal);
        let (wal, entries) = Wal::open(dir.path()).unwrap();
        assert!(entries.is_empty() && wal.is_empty());
    }
}
