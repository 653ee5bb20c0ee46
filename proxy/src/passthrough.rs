//! Byte relay between a client and its compute once the startup phase is over.
//!
//! From here on the proxy no longer looks at the protocol, so the cheapest thing is to not touch
//! the bytes at all: on Linux they go socket -> pipe -> socket with splice(2) and never enter user
//! space. When that is impossible (no fds left for pipes, another OS, or a TLS session whose
//! plaintext only exists in user space) a buffered copy with the same semantics takes over.
//!
//! Semantics shared by both modes:
//! - EOF on one side is forwarded as a TCP FIN (`shutdown(Write)`) to the other side after
//!   everything already read has been written, and the opposite direction keeps going: a client
//!   sends Terminate and closes, a server closes after a fatal error, and neither may cut off the
//!   bytes still travelling the other way.
//! - The first I/O error on either side ends the whole session at once; there is nothing useful
//!   left to do on a half-broken Postgres connection, and the caller drops both sockets.
//! - Memory per session is fixed (one pipe or one buffer per direction), whatever the traffic;
//!   the splice path's copies go through one scratch buffer per thread.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes delivered to the destination in each direction (not merely read from the source).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_compute: u64,
    pub compute_to_client: u64,
}

/// How the bytes of a session were moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Copy,
}

/// Why a session ended abnormally, with the side that failed so that metrics and logs can tell
/// a client that went away from a compute that crashed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client side: {0}")]
    Client(io::Error),
    #[error("compute side: {0}")]
    Compute(io::Error),
}

/// Always returned, even on error, because byte counts matter for metrics either way.
#[derive(Debug)]
pub struct RelayOutcome {
    pub mode: Mode,
    pub bytes: Transferred,
    /// Of `bytes`, what went through splice(2) without entering user space.
    pub spliced: Transferred,
    pub result: Result<(), RelayError>,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Compute,
}

impl Side {
    fn error(self, err: io::Error) -> RelayError {
        match self {
            Side::Client => RelayError::Client(err),
            Side::Compute => RelayError::Compute(err),
        }
    }
}

/// Relay until both directions are finished or either side fails.
///
/// Uses splice(2) where available and falls back to a buffered copy otherwise; `mode` in the
/// outcome says which one ran.
pub async fn relay(client: &mut TcpStream, compute: &mut TcpStream) -> RelayOutcome {
    relay_with_mode(client, compute, Mode::Splice).await
}

/// `Mode::Splice` is a preference (it still falls back to copying); `Mode::Copy` forces the copy
/// so tests can cover both paths on the same sockets.
pub(crate) async fn relay_with_mode(
    client: &mut TcpStream,
    compute: &mut TcpStream,
    mode: Mode,
) -> RelayOutcome {
    #[cfg(target_os = "linux")]
    if mode == Mode::Splice {
        return splice::relay(client, compute).await;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mode;

    relay_copy(client, compute).await
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Mode, RelayError, RelayOutcome, Side, Transferred};

    /// What a pipe is sized to (`F_SETPIPE_SZ`): 256 slots. Splicing from a socket fills one
    /// slot per chunk of a received segment, however small, so the default 16 slots often hold
    /// far less than their 64 KiB; a bulk transfer (COPY) then moves a few KiB per splice pair.
    /// Only the pages in use are memory; the rest is a slot table of a few KiB.
    pub(super) const PIPE_SIZE: usize = 1 << 20;

    /// A pipe is the kernel-side buffer splice needs between two sockets. `OwnedFd` closes both
    /// ends on every path, including when the relay future is dropped mid-session.
    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// What the pipe holds: what one splice from the socket asks for.
        capacity: usize,
    }

    impl Pipe {
        fn new() -> io::Result<Self> {
            let mut fds: [libc::c_int; 2] = [-1; 2];
            // O_NONBLOCK so that a full or empty pipe gives EAGAIN instead of parking a runtime
            // thread; O_CLOEXEC so that a spawned `postgres` does not inherit our pipes.
            // SAFETY: `fds` is a valid array of two c_ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let fd = write.as_raw_fd();
            let capacity = size_pipe(
                PIPE_SIZE,
                || {
                    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                },
                // SAFETY: fcntl on a pipe fd we own.
                |size| cvt(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) }),
                // SAFETY: fcntl on a pipe fd we own.
                || cvt(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }),
            );
            Ok(Pipe {
                read,
                write,
                capacity,
            })
        }
    }

    fn cvt(rc: libc::c_int) -> io::Result<usize> {
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }

    /// The capacity a new pipe ends up with: `want`, or, where the kernel refuses that (EPERM:
    /// above `/proc/sys/fs/pipe-max-size` without CAP_SYS_RESOURCE, or the user's pipes are
    /// over `pipe-user-pages-soft`), `pipe-max-size` if that is smaller, else what the pipe
    /// already has (64 KiB, or a page or two for a user over the soft limit). Never fails:
    /// a smaller pipe only means more splice calls.
    pub(super) fn size_pipe(
        want: usize,
        max_size: impl FnOnce() -> Option<usize>,
        mut set: impl FnMut(usize) -> io::Result<usize>,
        get: impl FnOnce() -> io::Result<usize>,
    ) -> usize {
        match set(want) {
            Ok(n) => return n,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                if let Some(max) = max_size().filter(|&m| m < want) {
                    if let Ok(n) = set(max) {
                        return n;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not resize a splice pipe"),
        }
        get().unwrap_or(64 * 1024)
    }

    pub(super) async fn relay(client: &TcpStream, compute: &TcpStream) -> RelayOutcome {
        let mut bytes = Transferred::default();
        let mut spliced = Transferred::default();
        // Both directions in one task over shared references: readiness for read and write is
        // tracked separately by tokio, so each socket can be read by one direction while the
        // other writes to it. try_join stops the healthy direction as soon as one fails.
        let result = tokio::try_join!(
            one_way(
                (client, Side::Client),
                (compute, Side::Compute),
                &mut bytes.client_to_compute,
                &mut spliced.client_to_compute,
            ),
            one_way(
                (compute, Side::Compute),
                (client, Side::Client),
                &mut bytes.compute_to_client,
                &mut spliced.compute_to_client,
            ),
        )
        .map(|((), ())| ());
        RelayOutcome {
            mode: Mode::Splice,
            bytes,
            spliced,
            result,
        }
    }

    /// Reads up to this much into the thread's scratch buffer and writes it out: two syscalls
    /// per wake-up, no pipe. A read that fills it means more is queued than one wake-up of a
    /// peer that keeps pace delivers, and the direction switches to splice until the socket is
    /// drained (a splice finds nothing to read).
    ///
    /// Why 64 KiB and not one page: a COPY arrives in segments of 8-16 KiB. With a 4 KiB
    /// buffer each of them went copy + splice in + splice out + a splice that finds the socket
    /// empty, five syscalls per segment, for as long as the relay kept pace with Postgres. That
    /// cost about half the throughput of a 1 GB COPY in some runs (the proxy then competes
    /// with the backend for a core). Now a segment costs a recv and a send, as in a buffering
    /// proxy, and splice takes over only when a backlog builds, where it moves up to a pipe's
    /// worth per pair of calls without copying.
    const CHUNK: usize = 64 * 1024;

    thread_local! {
        /// One buffer per thread, not per session: [`copy_once`] never holds it across an
        /// await, so memory per session stays what it was, and it is not zeroed per call.
        static SCRATCH: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
    }

    /// One direction of a session, hybrid: Postgres traffic is mostly small messages (a query,
    /// a few rows), for which read+write is cheaper than two splices through a pipe, and
    /// occasionally bulk (COPY, large results), where splice saves copying every byte through
    /// user space. The pipe is created the first time bulk shows up, so idle and chatty
    /// sessions cost no pipe fds at all.
    async fn one_way(
        (src, src_side): (&TcpStream, Side),
        (dst, dst_side): (&TcpStream, Side),
        delivered: &mut u64,
        spliced: &mut u64,
    ) -> Result<(), RelayError> {
        let mut pipe: Option<Pipe> = None;
        let mut bulk = false;
        loop {
            src.readable().await.map_err(|err| src_side.error(err))?;
            if bulk {
                if pipe.is_none() {
                    match Pipe::new() {
                        Ok(p) => pipe = Some(p),
                        // Out of fds: this direction keeps copying, which works just as well.
                        Err(err) => {
                            tracing::debug!(error = %err, "no pipe for splice, copying instead");
                            bulk = false;
                            continue;
                        }
                    }
                }
                let p = pipe.as_ref().expect("created above");
                match splice_once(src, dst, p, dst_side, src_side).await? {
                    Step::Eof => return shutdown_write(dst).map_err(|err| dst_side.error(err)),
                    Step::Moved(n) => {
                        *delivered += n as u64;
                        *spliced += n as u64;
                    }
                    // The socket is drained: back to small messages.
                    Step::Nothing => bulk = false,
                }
            } else {
                match copy_once(src, dst, src_side, dst_side)? {
                    Copied::Eof => return shutdown_write(dst).map_err(|err| dst_side.error(err)),
                    Copied::Nothing => {}
                    Copied::Done { n, full } => {
                        *delivered += n as u64;
                        bulk = full;
                    }
                    Copied::Partial { n, rest } => {
                        // The destination's send buffer is full: wait for it, holding only
                        // what did not fit (bounded by CHUNK).
                        *delivered += n as u64;
                        let mut off = 0;
                        while off < rest.len() {
                            let k = dst
                                .async_io(Interest::WRITABLE, || {
                                    send(dst.as_raw_fd(), &rest[off..])
                                })
                                .await
                                .map_err(|err| dst_side.error(err))?;
                            if k == 0 {
                                return Err(dst_side.error(io::ErrorKind::WriteZero.into()));
                            }
                            off += k;
                            *delivered += k as u64;
                        }
                    }
                }
            }
        }
    }

    enum Copied {
        Eof,
        Nothing,
        Done { n: usize, full: bool },
        Partial { n: usize, rest: Vec<u8> },
    }

    /// Synchronous on purpose: the scratch buffer never becomes part of the future, so a
    /// session's memory does not grow by it.
    fn copy_once(
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Result<Copied, RelayError> {
        SCRATCH.with(|scratch| copy_with(&mut scratch.borrow_mut(), src, dst, src_side, dst_side))
    }

    fn copy_with(
        buf: &mut [u8],
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Result<Copied, RelayError> {
        let mut got = 0usize;
        let read = src.try_io(Interest::READABLE, || {
            let n = recv(src.as_raw_fd(), buf)?;
            if n > 0 && n < buf.len() {
                // A short read proves the socket drained (epoll is edge-triggered): report
                // WouldBlock so tokio clears read readiness now instead of after one more
                // read that returns EAGAIN. tokio only clears if no newer event arrived in
                // between, so data that lands meanwhile is not missed.
                got = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match read {
            Ok(0) => return Ok(Copied::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Copied::Nothing),
            Err(e) => return Err(src_side.error(e)),
        };
        let mut off = 0;
        while off < n {
            match dst.try_io(Interest::WRITABLE, || send(dst.as_raw_fd(), &buf[off..n])) {
                Ok(0) => return Err(dst_side.error(io::ErrorKind::WriteZero.into())),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Copied::Partial {
                        n: off,
                        rest: buf[off..n].to_vec(),
                    })
                }
                Err(e) => return Err(dst_side.error(e)),
            }
        }
        Ok(Copied::Done {
            n,
            full: n == buf.len(),
        })
    }

    enum Step {
        Eof,
        /// The socket is drained.
        Nothing,
        Moved(usize),
    }

    async fn splice_once(
        src: &TcpStream,
        dst: &TcpStream,
        pipe: &Pipe,
        dst_side: Side,
        src_side: Side,
    ) -> Result<Step, RelayError> {
        // The pipe is empty here, so EAGAIN can only mean "socket has nothing to read". A short
        // splice does not mean the socket is drained, unlike a short recv: the pipe may have run
        // out of slots (one per chunk of each received segment, however small). So the pipe is
        // drained and the caller splices again until EAGAIN, which also clears readiness.
        let filled = match src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
        }) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Nothing),
            Err(e) => return Err(src_side.error(e)),
        };
        // Drain the pipe completely before reading again: it keeps the "pipe is empty when
        // reading" invariant above and bounds what sits in the kernel to one pipe.
        let mut in_pipe = filled;
        while in_pipe > 0 {
            // The pipe is not empty, so EAGAIN can only mean "socket send buffer is full".
            let n = dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), in_pipe)
                })
                .await
                .map_err(|err| dst_side.error(err))?;
            if n == 0 {
                // Cannot happen while we hold the write end and the pipe has data, but
                // retrying a zero-length result would spin, so fail instead.
                return Err(dst_side.error(io::ErrorKind::WriteZero.into()));
            }
            in_pipe = in_pipe.saturating_sub(n);
        }
        Ok(Step::Moved(filled))
    }

    fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid writable slice for the duration of the call.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }

    fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid readable slice; MSG_NOSIGNAL turns a dead peer into
            // EPIPE rather than a signal.
            let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// A broken peer gives EPIPE here rather than killing the process only because Rust binaries
    /// start with SIGPIPE ignored; splice has no MSG_NOSIGNAL equivalent.
    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: both fds stay open for the duration of the call (borrowed from live
            // TcpStream/OwnedFd values), and null offsets are what sockets and pipes require.
            let n = unsafe {
                libc::splice(
                    from,
                    std::ptr::null_mut(),
                    to,
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// `TcpStream` only offers shutdown through `&mut` (AsyncWrite), but the socket is shared
    /// with the opposite direction here, so go to the fd directly.
    fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
        // SAFETY: the fd belongs to a live TcpStream; shutdown does not invalidate it.
        if unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn eperm<T>() -> io::Result<T> {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }

        #[test]
        fn a_new_pipe_is_sized_for_bulk() {
            let pipe = Pipe::new().unwrap();
            // SAFETY: fcntl on a pipe fd the test owns.
            let real = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            assert_eq!(real as usize, pipe.capacity);
            let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // SAFETY: no arguments.
            if unsafe { libc::geteuid() } == 0 || max >= PIPE_SIZE {
                assert_eq!(pipe.capacity, PIPE_SIZE);
            } else {
                assert!(pipe.capacity >= 4096);
            }
        }

        #[test]
        fn above_pipe_max_size_the_pipe_gets_the_maximum() {
            let mut asked = Vec::new();
            let got = size_pipe(
                PIPE_SIZE,
                || Some(256 * 1024),
                |n| {
                    asked.push(n);
                    if n > 256 * 1024 {
                        eperm()
                    } else {
                        Ok(n)
                    }
                },
                || unreachable!("sized"),
            );
            assert_eq!(got, 256 * 1024);
            assert_eq!(asked, [PIPE_SIZE, 256 * 1024]);
        }

        #[test]
        fn a_refused_resize_keeps_the_pipe_as_it_is() {
            // Over pipe-user-pages-soft every increase is refused.
            let got = size_pipe(PIPE_SIZE, || Some(PIPE_SIZE), |_| eperm(), || Ok(8192));
            assert_eq!(got, 8192);
            // pipe-max-size unreadable (no /proc).
            let got = size_pipe(PIPE_SIZE, || None, |_| eperm(), || Ok(65536));
            assert_eq!(got, 65536);
            // Any other error.
            let got = size_pipe(
                PIPE_SIZE,
                || unreachable!("only read after EPERM"),
                |_| Err(io::Error::from_raw_os_error(libc::EINVAL)),
                || Ok(65536),
            );
            assert_eq!(got, 65536);
            // Not even the size readable: the kernel's default.
            let got = size_pipe(PIPE_SIZE, || None, |_| eperm(), eperm);
            assert_eq!(got, 64 * 1024);
        }
    }
}

/// Buffer per direction for the copy path. 16 KiB is the largest TLS plaintext record, so a TLS
/// session behind this relay is read and written in whole records (tokio's default of 8 KiB
/// would split every full record into two writes); two of them keep a session at 32 KiB.
pub const COPY_BUF_SIZE: usize = 16 * 1024;

/// Streams that are always ready (in-memory, or a TLS layer with buffered plaintext) would
/// otherwise let one session monopolise a runtime thread; tokio's own sockets already yield via
/// the task budget, this covers the rest.
const MAX_READS_PER_POLL: usize = 64;

/// Relay between any two streams with one fixed buffer per direction (used for TLS sessions and
/// as the fallback when splice is unavailable).
pub async fn relay_copy<A, B>(client: &mut A, compute: &mut B) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let up = CopyDirection::new(Side::Client, Side::Compute);
    let down = CopyDirection::new(Side::Compute, Side::Client);
    relay_directions(client, compute, up, down).await
}

/// One direction of a relay that moves bytes through user space: from `R` to `W` until EOF,
/// which it forwards as a shutdown.
trait Direction<R, W> {
    /// Ready(Ok) once EOF has been forwarded; stays Ready(Ok) when polled again, so that a
    /// finished direction can be polled alongside the other one.
    fn poll_transfer(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), RelayError>>;

    /// Bytes written to the destination so far.
    fn delivered(&self) -> u64;
}

/// Runs `up` (client to compute) and `down` until both are done or either fails.
async fn relay_directions<A, B>(
    client: &mut A,
    compute: &mut B,
    mut up: impl Direction<A, B>,
    mut down: impl Direction<B, A>,
) -> RelayOutcome {
    // A hand-written poll instead of join over split halves: `&mut A` cannot be borrowed by two
    // futures at once, and tokio::io::split would add a lock to every read and write.
    let result = poll_fn(|cx| {
        let up_done = up.poll_transfer(cx, &mut *client, &mut *compute)?;
        let down_done = down.poll_transfer(cx, &mut *compute, &mut *client)?;
        if up_done.is_ready() && down_done.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    RelayOutcome {
        mode: Mode::Copy,
        bytes: Transferred {
            client_to_compute: up.delivered(),
            compute_to_client: down.delivered(),
        },
        spliced: Transferred::default(),
        result,
    }
}

/// Relay for a client whose reads come out of a buffer (a TLS session: rustls decrypts each
/// record in its own buffer). The client's plaintext is written to the compute straight from
/// there, without the copy into a relay buffer that [`relay_copy`] makes; the other direction
/// reads [`TLS_DOWN_BUF_SIZE`] at a time, so that one write gives rustls two full records to
/// encrypt and send together. Same semantics and memory per session as `relay_copy`.
pub async fn relay_buffered<A, B>(client: &mut A, compute: &mut B) -> RelayOutcome
where
    A: AsyncBufRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let up = BufDirection::new(Side::Client, Side::Compute);
    let down = CopyDirection::with_capacity(Side::Compute, Side::Client, TLS_DOWN_BUF_SIZE);
    relay_directions(client, compute, up, down).await
}

/// The compute-to-client buffer of [`relay_buffered`]: two TLS records of plaintext. The other
/// direction has no buffer of its own, so a session still holds `2 * COPY_BUF_SIZE`.
pub const TLS_DOWN_BUF_SIZE: usize = 2 * COPY_BUF_SIZE;

/// One direction of [`relay_buffered`]: writes what the reader has buffered, then tells the
/// reader how much of it is gone.
struct BufDirection {
    src: Side,
    dst: Side,
    eof: bool,
    need_flush: bool,
    done: bool,
    delivered: u64,
}

impl BufDirection {
    fn new(src: Side, dst: Side) -> Self {
        Self {
            src,
            dst,
            eof: false,
            need_flush: false,
            done: false,
            delivered: 0,
        }
    }
}

impl<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin> Direction<R, W> for BufDirection {
    fn delivered(&self) -> u64 {
        self.delivered
    }

    /// A write that is pending leaves the data in the reader's buffer, which is then not
    /// refilled (rustls reads no more records while it holds plaintext), so nothing grows
    /// while the compute is slow.
    fn poll_transfer(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), RelayError>> {
        let mut reads = 0;
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))
                    .map_err(|err| self.dst.error(err))?;
                self.done = true;
                continue;
            }
            if reads == MAX_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let chunk = match Pin::new(&mut *reader).poll_fill_buf(cx) {
                Poll::Ready(Ok(chunk)) => chunk,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(self.src.error(err))),
                Poll::Pending => {
                    if self.need_flush {
                        if let Poll::Ready(res) = Pin::new(&mut *writer).poll_flush(cx) {
                            res.map_err(|err| self.dst.error(err))?;
                            self.need_flush = false;
                        }
                    }
                    return Poll::Pending;
                }
            };
            reads += 1;
            if chunk.is_empty() {
                self.eof = true;
                continue;
            }
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))
                .map_err(|err| self.dst.error(err))?;
            if n == 0 {
                return Poll::Ready(Err(self.dst.error(io::ErrorKind::WriteZero.into())));
            }
            Pin::new(&mut *reader).consume(n);
            self.delivered += n as u64;
            self.need_flush = true;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    Running,
    ShuttingDown,
    Done,
}

struct CopyDirection {
    src: Side,
    dst: Side,
    buf: Box<[u8]>,
    /// `buf[pos..filled]` has been read but not yet written.
    pos: usize,
    filled: usize,
    read_eof: bool,
    /// Something was written since the last flush; matters for buffering writers such as TLS.
    need_flush: bool,
    state: CopyState,
    delivered: u64,
}

impl CopyDirection {
    fn new(src: Side, dst: Side) -> Self {
        Self::with_capacity(src, dst, COPY_BUF_SIZE)
    }

    fn with_capacity(src: Side, dst: Side, size: usize) -> Self {
        CopyDirection {
            src,
            dst,
            buf: vec![0; size].into_boxed_slice(),
            pos: 0,
            filled: 0,
            read_eof: false,
            need_flush: false,
            state: CopyState::Running,
            delivered: 0,
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Direction<R, W> for CopyDirection {
    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn poll_transfer(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), RelayError>> {
        let mut reads = 0;
        loop {
            match self.state {
                CopyState::Done => return Poll::Ready(Ok(())),
                CopyState::ShuttingDown => {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))
                        .map_err(|err| self.dst.error(err))?;
                    self.state = CopyState::Done;
                }
                CopyState::Running => {
                    // Like the splice path, empty the buffer before reading more, so EOF is only
                    // forwarded after the last byte.
                    while self.pos < self.filled {
                        let chunk = &self.buf[self.pos..self.filled];
                        let n = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))
                            .map_err(|err| self.dst.error(err))?;
                        if n == 0 {
                            return Poll::Ready(Err(self
                                .dst
                                .error(io::ErrorKind::WriteZero.into())));
                        }
                        self.pos += n;
                        self.delivered += n as u64;
                        self.need_flush = true;
                    }
                    if self.read_eof {
                        self.state = CopyState::ShuttingDown;
                        continue;
                    }
                    if reads == MAX_READS_PER_POLL {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }

                    let mut read_buf = ReadBuf::new(&mut self.buf);
                    match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                        Poll::Ready(Ok(())) => {
                            let n = read_buf.filled().len();
                            self.pos = 0;
                            self.filled = n;
                            self.read_eof = n == 0;
                            reads += 1;
                        }
                        Poll::Ready(Err(err)) => return Poll::Ready(Err(self.src.error(err))),
                        Poll::Pending => {
                            // Nothing more to read for now: push out what a buffering writer is
                            // holding, or a small reply could sit in a TLS buffer indefinitely.
                            if self.need_flush {
                                if let Poll::Ready(res) = Pin::new(&mut *writer).poll_flush(cx) {
                                    res.map_err(|err| self.dst.error(err))?;
                                    self.need_flush = false;
                                }
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(20);

    async fn within_timeout<F: std::future::Future>(fut: F) -> F::Output {
        tokio::time::timeout(TEST_TIMEOUT, fut)
            .await
            .expect("test timed out")
    }

    /// Test client and test server connected through a relay running in its own task; the task
    /// owns (and so drops) the proxy's two sockets when the relay returns, like the real caller.
    struct Proxied {
        client: TcpStream,
        server: TcpStream,
        relay: JoinHandle<RelayOutcome>,
    }

    async fn proxied(mode: Mode) -> Proxied {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxy_client, _) = front.accept().await.unwrap();
        let mut proxy_compute = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        let relay = tokio::spawn(async move {
            relay_with_mode(&mut proxy_client, &mut proxy_compute, mode).await
        });
        Proxied {
            client,
            server,
            relay,
        }
    }

    fn expected_mode(requested: Mode) -> Mode {
        if cfg!(target_os = "linux") {
            requested
        } else {
            Mode::Copy
        }
    }

    /// Each scenario runs once per mode, on the same sockets and assertions.
    macro_rules! both_modes {
        ($name:ident, $scenario:ident $(, $flavor:tt)?) => {
            mod $name {
                use super::*;

                #[tokio::test$($flavor)?]
                async fn splice() {
                    within_timeout($scenario(Mode::Splice)).await;
                }

                #[tokio::test$($flavor)?]
                async fn copy() {
                    within_timeout($scenario(Mode::Copy)).await;
                }
            }
        };
    }

    both_modes!(echo, echo_scenario);
    both_modes!(
        large_transfer,
        large_transfer_scenario,
        (flavor = "multi_thread", worker_threads = 4)
    );
    both_modes!(half_close, half_close_scenario);
    both_modes!(compute_reset, compute_reset_scenario);
    both_modes!(client_reset, client_reset_scenario);
    both_modes!(small_writes, small_writes_scenario);
    both_modes!(stalled_reader, stalled_reader_scenario);

    /// The client stops reading while the compute sends in segments smaller than one copy, so
    /// the relay's write to the client runs into a full buffer partway through a segment and
    /// must hold the rest until the client reads again. Nothing may be lost, duplicated or
    /// reordered, and the relay must pick up again by itself.
    async fn stalled_reader_scenario(mode: Mode) {
        const SEGMENT: usize = 8 * 1024;
        let Proxied {
            client,
            server,
            relay,
        } = proxied(mode).await;
        let p = pattern(0x5DEE_CE66_D1CE_4E5B);
        let (client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let mut sent = 0;
        loop {
            let start = sent % p.len();
            let len = (p.len() - start).min(SEGMENT);
            let write = server_write.write_all(&p[start..start + len]);
            tokio::pin!(write);
            if futures::poll!(write.as_mut()).is_ready() {
                sent += len;
                // Lets the relay take each segment on its own, as from a compute it keeps pace
                // with: tokio polls the reactor before a yielded task runs again.
                tokio::task::yield_now().await;
                continue;
            }
            // A write that cannot complete: every buffer from here to the client is full, so
            // the relay is waiting for the client. Now the client reads everything.
            let reader = tokio::spawn({
                let p = p.clone();
                async move { receive_pattern(client_read, &p).await }
            });
            write.await.unwrap();
            sent += len;
            server_write.shutdown().await.unwrap();
            assert_eq!(reader.await.unwrap(), sent);
            break;
        }
        client_write.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server_read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let outcome = relay.await.unwrap();
        outcome.result.unwrap();
        assert_eq!(outcome.bytes.compute_to_client, sent as u64);
    }

    async fn echo_scenario(mode: Mode) {
        let Proxied {
            mut client,
            mut server,
            relay,
        } = proxied(mode).await;
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    server.shutdown().await.unwrap();
                    return;
                }
                server.write_all(&buf[..n]).await.unwrap();
            }
        });

        let mut sent = 0u64;
        for msg in [&b"hello"[..], b"select 1;", &[0u8; 1000]] {
            client.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
            sent += msg.len() as u64;
        }
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        echo.await.unwrap();
        let outcome = relay.await.unwrap();
        outcome.result.unwrap();
        assert_eq!(outcome.mode, expected_mode(mode));
        assert_eq!(
            outcome.bytes,
            Transferred {
                client_to_compute: sent,
                compute_to_client: sent,
            }
        );
    }

    /// Random-looking data whose every position is checked, so loss, duplication and reordering
    /// all show up. The odd length keeps the pattern from lining up with socket or pipe sizes.
    fn pattern(seed: u64) -> Arc<Vec<u8>> {
        let mut x = seed;
        let data = (0..(1 << 20) + 13)
            .map(|_| {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Arc::new(data)
    }

    async fn send_pattern<W: AsyncWrite + Unpin>(mut w: W, pattern: &[u8], total: usize) {
        let mut off = 0;
        while off < total {
            let start = off % pattern.len();
            let len = (pattern.len() - start).min(64 * 1024).min(total - off);
            w.write_all(&pattern[start..start + len]).await.unwrap();
            off += len;
        }
        w.shutdown().await.unwrap();
    }

    async fn receive_pattern<R: AsyncRead + Unpin>(mut r: R, pattern: &[u8]) -> usize {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return off;
            }
            let mut got = &buf[..n];
            while !got.is_empty() {
                let start = off % pattern.len();
                let len = (pattern.len() - start).min(got.len());
                assert!(
                    got[..len] == pattern[start..start + len],
                    "corrupt data at {off}"
                );
                got = &got[len..];
                off += len;
            }
        }
    }

    async fn large_transfer_scenario(mode: Mode) {
        const UP: usize = 64 << 20;
        const DOWN: usize = 1 << 20;
        let Proxied {
            client,
            server,
            relay,
        } = proxied(mode).await;
        let up_pattern = pattern(0x9E37_79B9_7F4A_7C15);
        let down_pattern = pattern(0xD1B5_4A32_D192_ED03);
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();

        let started = Instant::now();
        let tasks = [
            tokio::spawn({
                let p = up_pattern.clone();
                async move {
                    send_pattern(client_write, &p, UP).await;
                    0
                }
            }),
            tokio::spawn({
                let p = up_pattern.clone();
                async move { receive_pattern(server_read, &p).await }
            }),
            tokio::spawn({
                let p = down_pattern.clone();
                async move {
                    send_pattern(server_write, &p, DOWN).await;
                    0
                }
            }),
            tokio::spawn({
                let p = down_pattern.clone();
                async move { receive_pattern(client_read, &p).await }
            }),
        ];
        let mut received = Vec::new();
        for task in tasks {
            received.push(task.await.unwrap());
        }
        let outcome = relay.await.unwrap();
        let elapsed = started.elapsed();

        assert_eq!(received[1], UP);
        assert_eq!(received[3], DOWN);
        outcome.result.unwrap();
        assert_eq!(outcome.mode, expected_mode(mode));
        assert_eq!(
            outcome.bytes,
            Transferred {
                client_to_compute: UP as u64,
                compute_to_client: DOWN as u64,
            }
        );
        if outcome.mode == Mode::Splice {
            // Bulk must actually go zero-copy, not only small reads through user space. How
            // much depends on how reads and sends interleave, so only "most of it" is asserted.
            assert!(
                outcome.spliced.client_to_compute > (UP / 2) as u64,
                "only {} of {UP} bytes spliced",
                outcome.spliced.client_to_compute
            );
        } else {
            assert_eq!(outcome.spliced, Transferred::default());
        }
        // Informational only: timing depends on the machine and must never fail a test.
        println!(
            "passthrough {:?}: {} MiB + {} MiB ({} B spliced up) in {:?} ({:.0} MB/s)",
            outcome.mode,
            UP >> 20,
            DOWN >> 20,
            outcome.spliced.client_to_compute,
            elapsed,
            (UP + DOWN) as f64 / elapsed.as_secs_f64() / 1e6
        );
    }

    async fn half_close_scenario(mode: Mode) {
        let Proxied {
            mut client,
            mut server,
            relay,
        } = proxied(mode).await;

        client.write_all(b"query").await.unwrap();
        client.shutdown().await.unwrap();

        // The server sees the client's FIN only after the data, then answers on its still-open
        // direction, then closes.
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"query");
        server.write_all(b"response").await.unwrap();
        drop(server);

        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response");

        let outcome = relay.await.unwrap();
        outcome.result.unwrap();
        assert_eq!(
            outcome.bytes,
            Transferred {
                client_to_compute: 5,
                compute_to_client: 8,
            }
        );
    }

    /// Makes close() send RST instead of FIN, like a crashed peer.
    fn reset_on_drop(stream: &TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and a correctly sized, initialised option value.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// A reset must end the session without waiting for the healthy side to do anything, and the
    /// healthy side must then see its connection closed (the relay task dropped the sockets).
    async fn expect_prompt_end(
        relay: JoinHandle<RelayOutcome>,
        survivor: &mut TcpStream,
    ) -> RelayOutcome {
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay did not end after a reset")
            .unwrap();
        // Whatever was still in flight may arrive first; what matters is that the end comes.
        let mut sink = Vec::new();
        let _ = survivor.read_to_end(&mut sink).await;
        outcome
    }

    async fn compute_reset_scenario(mode: Mode) {
        let Proxied {
            mut client,
            mut server,
            relay,
        } = proxied(mode).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();

        reset_on_drop(&server);
        drop(server);

        let outcome = expect_prompt_end(relay, &mut client).await;
        assert!(
            matches!(outcome.result, Err(RelayError::Compute(_))),
            "{:?}",
            outcome.result
        );
        assert_eq!(outcome.bytes.client_to_compute, 4);
    }

    async fn client_reset_scenario(mode: Mode) {
        let Proxied {
            client,
            mut server,
            relay,
        } = proxied(mode).await;
        server.write_all(b"notice").await.unwrap();
        reset_on_drop(&client);
        drop(client);

        let outcome = expect_prompt_end(relay, &mut server).await;
        assert!(
            matches!(outcome.result, Err(RelayError::Client(_))),
            "{:?}",
            outcome.result
        );
    }

    fn small_message(i: usize, tag: u8) -> Vec<u8> {
        vec![tag.wrapping_add(i as u8); 1 + i % 37]
    }

    async fn small_writes_scenario(mode: Mode) {
        const BURST: usize = 5_000;
        const ROUND_TRIPS: usize = 300;
        let Proxied {
            client,
            server,
            relay,
        } = proxied(mode).await;
        client.set_nodelay(true).unwrap();
        server.set_nodelay(true).unwrap();

        // Both sides first write many tiny messages at the same time while the other reads,
        // then play ping-pong, where any byte stuck in a buffer would stall the exchange.
        let side = |stream: TcpStream, my_tag: u8, peer_tag: u8, starts: bool| async move {
            let (mut r, mut w) = stream.into_split();
            let expected: Vec<u8> = (0..BURST)
                .flat_map(|i| small_message(i, peer_tag))
                .collect();
            let reader = tokio::spawn(async move {
                let mut got = vec![0u8; expected.len()];
                r.read_exact(&mut got).await.unwrap();
                assert!(got == expected, "burst corrupted");
                r
            });
            let mut sent = 0u64;
            for i in 0..BURST {
                let msg = small_message(i, my_tag);
                w.write_all(&msg).await.unwrap();
                sent += msg.len() as u64;
            }
            let mut r = reader.await.unwrap();

            for i in 0..ROUND_TRIPS {
                let mine = small_message(i, my_tag);
                let theirs = small_message(i, peer_tag);
                let mut got = vec![0u8; theirs.len()];
                if starts {
                    w.write_all(&mine).await.unwrap();
                    r.read_exact(&mut got).await.unwrap();
                } else {
                    r.read_exact(&mut got).await.unwrap();
                    w.write_all(&mine).await.unwrap();
                }
                assert_eq!(got, theirs);
                sent += mine.len() as u64;
            }
            w.shutdown().await.unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            sent
        };
        let (client_sent, server_sent) = tokio::join!(
            side(client, b'c', b's', true),
            side(server, b's', b'c', false)
        );

        let outcome = relay.await.unwrap();
        outcome.result.unwrap();
        assert_eq!(
            outcome.bytes,
            Transferred {
                client_to_compute: client_sent,
                compute_to_client: server_sent,
            }
        );
    }

    /// The copy path is generic so it can carry TLS sessions; in-memory streams exercise it
    /// without sockets, including EOF forwarding through shutdown.
    #[tokio::test]
    async fn copy_over_generic_streams() {
        within_timeout(async {
            let (mut client_proxy, mut client) = tokio::io::duplex(1024);
            let (mut compute_proxy, mut compute) = tokio::io::duplex(1024);
            let relay =
                tokio::spawn(
                    async move { relay_copy(&mut client_proxy, &mut compute_proxy).await },
                );

            client.write_all(b"Q").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            compute.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"Q");
            compute.write_all(b"Z").await.unwrap();
            compute.shutdown().await.unwrap();
            got.clear();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"Z");

            let outcome = relay.await.unwrap();
            outcome.result.unwrap();
            assert_eq!(outcome.mode, Mode::Copy);
            assert_eq!(
                outcome.bytes,
                Transferred {
                    client_to_compute: 1,
                    compute_to_client: 1,
                }
            );
        })
        .await;
    }
    /// COPY-like bulk: the sender writes 8 KiB at a time (as Postgres flushes its output
    /// buffer), so the receive queue holds many small segments.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_like_bulk_of_small_segments_arrives_intact_and_spliced() {
        const TOTAL: usize = 64 << 20;
        let Proxied {
            client,
            server,
            relay,
        } = proxied(Mode::Splice).await;
        client.set_nodelay(true).unwrap();
        let p = pattern(0x1234_5678_9ABC_DEF1);
        let send = tokio::spawn({
            let p = p.clone();
            async move {
                let mut w = server;
                let mut off = 0;
                while off < TOTAL {
                    let start = off % p.len();
                    let len = (p.len() - start).min(8192).min(TOTAL - off);
                    w.write_all(&p[start..start + len]).await.unwrap();
                    off += len;
                }
                w.shutdown().await.unwrap();
                w
            }
        });
        let (r, mut w) = client.into_split();
        let got = receive_pattern(r, &p).await;
        w.shutdown().await.unwrap();
        drop(send.await.unwrap());
        let outcome = relay.await.unwrap();
        assert_eq!(got, TOTAL);
        outcome.result.unwrap();
        assert_eq!(outcome.bytes.compute_to_client, TOTAL as u64);
        // Each splice may stop at a pipe full of small segments; the direction must stay on
        // splice (drain, then splice again), not drop to small copies after each one.
        assert!(
            outcome.spliced.compute_to_client > (TOTAL / 2) as u64,
            "only {} of {TOTAL} bytes spliced",
            outcome.spliced.compute_to_client
        );
    }
    /// The buffered relay over in-memory streams: a client reading through a buffer (as a TLS
    /// session does), large data both ways checked byte for byte, EOF forwarded each way.
    #[tokio::test]
    async fn buffered_client_relays_both_ways() {
        within_timeout(async {
            let (client_proxy, client) = tokio::io::duplex(64 * 1024);
            let (mut compute_proxy, compute) = tokio::io::duplex(64 * 1024);
            let relay = tokio::spawn(async move {
                let mut client_proxy = tokio::io::BufReader::with_capacity(5000, client_proxy);
                relay_buffered(&mut client_proxy, &mut compute_proxy).await
            });
            const UP: usize = 3 << 20;
            const DOWN: usize = 5 << 20;
            let up = pattern(7);
            let down = pattern(11);
            let (client_r, client_w) = tokio::io::split(client);
            let (compute_r, compute_w) = tokio::io::split(compute);
            let (_, got_up, _, got_down) = tokio::join!(
                send_pattern(client_w, &up, UP),
                receive_pattern(compute_r, &up),
                send_pattern(compute_w, &down, DOWN),
                receive_pattern(client_r, &down),
            );
            assert_eq!((got_up, got_down), (UP, DOWN));
            let outcome = relay.await.unwrap();
            outcome.result.unwrap();
            assert_eq!(
                outcome.bytes,
                Transferred {
                    client_to_compute: UP as u64,
                    compute_to_client: DOWN as u64,
                }
            );
        })
        .await;
    }
}
