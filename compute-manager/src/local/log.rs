//! A compute's server log, bounded: postgres's stdout and stderr are pipes that pgwake drains
//! into `<data_root>/<id>.log`, which turns into `<id>.log.1` (replacing the previous one)
//! when it would grow past `[local] log_max_size`. So a compute's log never takes more than
//! twice the limit, whatever a client makes it write (a flood of failed logins to a
//! passthrough endpoint logs a line each).
//!
//! Postgres's own `logging_collector` cannot do this: what postgres writes before the
//! collector runs (and when it fails to start) still goes to stderr, unbounded.
//!
//! The pipes are read as fast as they fill, so postgres never waits on its log: when the file
//! writer falls behind (a slow or full disk), the lines that do not fit in a bounded queue
//! are dropped and counted, and a note with the count goes into the log once it catches up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// Longest line kept whole; a longer one is cut into lines of this length.
const MAX_LINE: usize = 8 * 1024;
/// Lines waiting for the file writer: at most `MAX_LINE` each, so a few MiB of memory at most.
const QUEUE_LINES: usize = 512;
/// Lines written to the file in one go.
const BATCH_BYTES: usize = 256 * 1024;
/// How much of the newest output is kept in memory for the start-failure classifier.
const TAIL_BYTES: usize = 4096;
/// Smallest `log_max_size` accepted: less would rotate at every few lines.
pub const MIN_LOG_SIZE: u64 = 64 * 1024;

/// `[local] log_max_size`: bytes, as an integer or a string with a unit (`"10MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSize(pub u64);

impl Default for LogSize {
    fn default() -> Self {
        Self(10 * 1024 * 1024)
    }
}

impl LogSize {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "kB" | "KB" => 1024,
            "MiB" | "MB" => 1024 * 1024,
            "GiB" | "GB" => 1024 * 1024 * 1024,
            _ => return None,
        };
        n.checked_mul(scale).map(Self)
    }
}

impl<'de> Deserialize<'de> for LogSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(s) => Self::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a size (a number of bytes, or with KiB, MiB or GiB)"
                ))
            }),
        }
    }
}

/// `<id>.log.1` beside `<id>.log`.
pub fn rotated(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// The drain of one postgres's output. The tasks end by themselves when every process that
/// holds the pipes (the postmaster and its children) has exited.
pub struct LogPump {
    tail: Arc<Mutex<Vec<u8>>>,
    writer: JoinHandle<()>,
}

impl LogPump {
    /// Starts draining `outputs` into `log`.
    pub fn start<R>(outputs: Vec<R>, log: PathBuf, max_size: LogSize) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        for out in outputs {
            tokio::spawn(read_lines(out, tx.clone(), Arc::clone(&dropped)));
        }
        let tail = Arc::new(Mutex::new(Vec::new()));
        let file = LogFile {
            path: log,
            max_size: max_size.0.max(MIN_LOG_SIZE),
            file: None,
            size: 0,
        };
        let writer = tokio::spawn(write_lines(rx, file, Arc::clone(&tail), dropped));
        Self { tail, writer }
    }

    /// The newest output (a few KiB), after waiting up to `within` for the pipes to close and
    /// everything read to be written: for a postgres that exited during start-up, whose last
    /// words say why.
    pub async fn settle(&mut self, within: Duration) -> String {
        let _ = tokio::time::timeout(within, &mut self.writer).await;
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&tail).into_owned()
    }
}

/// Splits `out` into lines of at most [`MAX_LINE`] bytes and queues them, dropping (and
/// counting) those that find the queue full: the pipe is always drained.
async fn read_lines<R: AsyncRead + Unpin>(
    mut out: R,
    tx: mpsc::Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
) {
    let mut pending: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut chunk = vec![0u8; MAX_LINE];
    let send = |line: Vec<u8>| {
        if tx.try_send(line).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        let n = match out.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &chunk[..n];
        while !data.is_empty() {
            let room = MAX_LINE - pending.len();
            let take = match data.iter().take(room).position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => data.len().min(room),
            };
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if pending.ends_with(b"\n") || pending.len() == MAX_LINE {
                if !pending.ends_with(b"\n") {
                    pending.push(b'\n');
                }
                send(std::mem::replace(
                    &mut pending,
                    Vec::with_capacity(MAX_LINE),
                ));
            }
        }
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        send(pending);
    }
}

async fn write_lines(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut file: LogFile,
    tail: Arc<Mutex<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
) {
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        let mut lines = vec![first];
        let mut bytes = lines[0].len();
        while bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(l) => {
                    bytes += l.len();
                    lines.push(l);
                }
                Err(_) => break,
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            warn!(log = %file.path.display(), lines = lost, "compute log writer fell behind; lines dropped");
            lines.insert(
                0,
                format!("pgwake: {lost} log lines dropped (the log writer fell behind)\n")
                    .into_bytes(),
            );
        }
        {
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            for l in &lines {
                t.extend_from_slice(l);
            }
            if t.len() > 2 * TAIL_BYTES {
                let cut = t.len() - TAIL_BYTES;
                t.drain(..cut);
            }
        }
        match file.write(&lines).await {
            Ok(()) => failed = false,
            // A full disk: the lines are lost, the pipe keeps draining, one warning per outage.
            Err(e) if !failed => {
                failed = true;
                warn!(log = %file.path.display(), error = %e, "cannot write the compute log; dropping its lines");
            }
            Err(_) => {}
        }
    }
}

/// `<id>.log` with its size, rotated to `<id>.log.1` before it would pass `max_size`.
struct LogFile {
    path: PathBuf,
    max_size: u64,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl LogFile {
    async fn open(&mut self) -> std::io::Result<&mut tokio::fs::File> {
        if self.file.is_none() {
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            self.size = f.metadata().await?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    async fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush().await?;
        }
        tokio::fs::rename(&self.path, rotated(&self.path)).await?;
        self.size = 0;
        Ok(())
    }

    async fn write(&mut self, lines: &[Vec<u8>]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(BATCH_BYTES);
        for line in lines {
            self.open().await?;
            // Lines are far shorter than the limit, so a file past it holds at least one.
            if self.size + (buf.len() + line.len()) as u64 > self.max_size
                && self.size + buf.len() as u64 > 0
            {
                self.flush_buf(&mut buf).await?;
                self.rotate().await?;
                self.open().await?;
            }
            buf.extend_from_slice(line);
        }
        self.flush_buf(&mut buf).await
    }

    async fn flush_buf(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let f = self.open().await?;
        f.write_all(buf).await?;
        f.flush().await?;
        self.size += buf.len() as u64;
        buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map_or(0, |m| m.len())
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(LogSize::parse("10MiB"), Some(LogSize(10 << 20)));
        assert_eq!(LogSize::parse("64 KiB"), Some(LogSize(64 << 10)));
        assert_eq!(LogSize::parse("123"), Some(LogSize(123)));
        assert_eq!(LogSize::parse("1GiB"), Some(LogSize(1 << 30)));
        assert_eq!(LogSize::parse("ten"), None);
        assert_eq!(LogSize::parse("10 parsecs"), None);
        assert_eq!(LogSize::parse("99999999999999999999GiB"), None);
    }

    #[tokio::test]
    async fn a_flood_is_rotated_and_stays_under_twice_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("demo.log");
        std::fs::write(&log, "from an earlier start\n").unwrap();
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let mut pump = LogPump::start(vec![r], log.clone(), LogSize(MIN_LOG_SIZE));
        let line = format!("LOG:  {}\n", "x".repeat(100));
        for _ in 0..10_000 {
            w.write_all(line.as_bytes()).await.unwrap();
        }
        drop(w);
        // Some lines may have been dropped (this writer races the reader); the bound holds.
        let tail = pump.settle(Duration::from_secs(10)).await;
        assert!(tail.contains("LOG:  xxx"), "{tail}");
        assert!(tail.len() <= 2 * TAIL_BYTES);
        let (a, b) = (size(&log), size(&rotated(&log)));
        assert!(a <= MIN_LOG_SIZE && b <= MIN_LOG_SIZE, "{a} + {b}");
        assert!(b > MIN_LOG_SIZE / 2, "rotated once full: {b}");
        let text = std::fs::read_to_string(&log).unwrap();
        // Every line whole: nothing cut at a rotation.
        let rotated_text = std::fs::read_to_string(rotated(&log)).unwrap();
        assert!(rotated_text
            .lines()
            .chain(text.lines())
            .all(|l| l == line.trim_end() || l.starts_with("pgwake: ")));
    }

    #[tokio::test]
    async fn a_line_longer_than_the_maximum_is_cut_and_the_pump_ends_with_its_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("demo.log");
        let (mut w1, r1) = tokio::io::duplex(1024);
        let (mut w2, r2) = tokio::io::duplex(1024);
        let mut pump = LogPump::start(vec![r1, r2], log.clone(), LogSize::default());
        w1.write_all(&vec![b'a'; MAX_LINE + 10]).await.unwrap();
        w2.write_all(b"stdout line\n").await.unwrap();
        drop((w1, w2));
        pump.settle(Duration::from_secs(10)).await;
        assert!(pump.writer.is_finished());
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<usize> = text.lines().map(str::len).collect();
        lines.sort();
        assert_eq!(lines, vec![10, 11, MAX_LINE], "{text:.40}");
    }

    #[tokio::test]
    async fn lines_that_find_the_queue_full_are_dropped_and_counted() {
        let (tx, mut rx) = mpsc::channel(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        w.write_all(b"1\n2\n3\n4\n5\n").await.unwrap();
        drop(w);
        // No writer draining the queue: the reader must not wait for one.
        tokio::time::timeout(
            Duration::from_secs(10),
            read_lines(r, tx, Arc::clone(&dropped)),
        )
        .await
        .expect("the reader never blocks on a full queue");
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.recv().await.unwrap(), b"1\n");
    }
}
