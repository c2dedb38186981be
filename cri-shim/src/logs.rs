//! The CRI container log format the kubelet reads: one record per line,
//! `<RFC3339Nano timestamp> <stdout|stderr> <F|P> <message>`, where `P` marks a partial line
//! (split because it was too long) and `F` the last piece of a line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};

/// The longest piece written as one record; longer lines are split into `P` records.
pub const MAX_RECORD: usize = 16 * 1024;

/// Which of the container's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

impl Stream {
    fn tag(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats one record (without I/O), the unit the tests and the writer share.
pub fn format_record(at: DateTime<Utc>, stream: Stream, partial: bool, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 48);
    out.extend_from_slice(at.to_rfc3339_opts(SecondsFormat::Nanos, true).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.tag().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(msg);
    out.push(b'\n');
    out
}

/// Turns the two raw output streams of a container into CRI log records in one file.
/// Without a path (the pod has no log directory) output is consumed and dropped.
#[derive(Debug)]
pub struct LogWriter {
    path: Option<PathBuf>,
    file: Option<File>,
    pending: [Vec<u8>; 2],
}

impl LogWriter {
    /// Opens (appending, creating) the log at `path`.
    pub fn open(path: Option<&Path>) -> io::Result<Self> {
        let mut writer = Self {
            path: path.map(Path::to_path_buf),
            file: None,
            pending: [Vec::new(), Vec::new()],
        };
        writer.reopen()?;
        Ok(writer)
    }

    /// Reopens the file by path, for log rotation (ReopenContainerLog).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = match &self.path {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(p)?,
            ),
            None => None,
        };
        Ok(())
    }

    /// Consumes a chunk read from `stream`: complete lines become `F` records, a line longer
    /// than [`MAX_RECORD`] is cut into `P` records, the rest waits for more data.
    pub fn write(&mut self, stream: Stream, chunk: &[u8]) -> io::Result<()> {
        let idx = stream as usize;
        let mut buf = std::mem::take(&mut self.pending[idx]);
        buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut out = Vec::new();
        let now = Utc::now();
        while start < buf.len() {
            match buf[start..].iter().position(|&b| b == b'\n') {
                Some(n) if n <= MAX_RECORD => {
                    out.extend(format_record(now, stream, false, &buf[start..start + n]));
                    start += n + 1;
                }
                _ if buf.len() - start > MAX_RECORD => {
                    out.extend(format_record(
                        now,
                        stream,
                        true,
                        &buf[start..start + MAX_RECORD],
                    ));
                    start += MAX_RECORD;
                }
                _ => break,
            }
        }
        self.pending[idx] = buf.split_off(start);
        self.emit(&out)
    }

    /// Writes what is left of `stream` as a final `F` record (its pipe closed).
    pub fn finish(&mut self, stream: Stream) -> io::Result<()> {
        let rest = std::mem::take(&mut self.pending[stream as usize]);
        if rest.is_empty() {
            return Ok(());
        }
        self.emit(&format_record(Utc::now(), stream, false, &rest))
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        match (&mut self.file, bytes.is_empty()) {
            (Some(f), false) => f.write_all(bytes),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let ts = it.next().unwrap();
                DateTime::parse_from_rfc3339(ts).expect("RFC3339 timestamp");
                let s = it.next().unwrap().to_string();
                let t = it.next().unwrap().to_string();
                (s, t, it.next().unwrap_or("").to_string())
            })
            .collect()
    }

    #[test]
    fn lines_are_tagged_by_stream_and_completed_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut w = LogWriter::open(Some(&path)).unwrap();
        w.write(Stream::Stdout, b"hel").unwrap();
        w.write(Stream::Stderr, b"oops\n").unwrap();
        w.write(Stream::Stdout, b"lo\nworld\n\ntail").unwrap();
        w.finish(Stream::Stdout).unwrap();
        w.finish(Stream::Stderr).unwrap();
        let r = records(&path);
        let want = [
            ("stderr", "F", "oops"),
            ("stdout", "F", "hello"),
            ("stdout", "F", "world"),
            ("stdout", "F", ""),
            ("stdout", "F", "tail"),
        ];
        let got: Vec<_> = r
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn long_lines_are_split_into_partial_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut w = LogWriter::open(Some(&path)).unwrap();
        let mut line = vec![b'x'; MAX_RECORD * 2 + 10];
        line.push(b'\n');
        w.write(Stream::Stdout, &line).unwrap();
        let r = records(&path);
        let tags: Vec<_> = r.iter().map(|(_, t, m)| (t.as_str(), m.len())).collect();
        assert_eq!(tags, [("P", MAX_RECORD), ("P", MAX_RECORD), ("F", 10)]);
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut w = LogWriter::open(Some(&path)).unwrap();
        w.write(Stream::Stdout, b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        w.reopen().unwrap();
        w.write(Stream::Stdout, b"two\n").unwrap();
        assert_eq!(records(&path)[0].2, "two");
        assert_eq!(records(&dir.path().join("0.log.1"))[0].2, "one");
    }

    #[test]
    fn timestamps_have_nanoseconds_and_utc_zone() {
        let rec = format_record(Utc::now(), Stream::Stdout, false, b"m");
        let text = String::from_utf8(rec).unwrap();
        let ts = text.split(' ').next().unwrap();
        assert!(ts.ends_with('Z'), "{ts}");
        assert_eq!(
            ts.split('.').nth(1).unwrap().len(),
            10,
            "9 digits + Z: {ts}"
        );
    }
}
