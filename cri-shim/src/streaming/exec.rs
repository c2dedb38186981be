//! Exec: a command started in a running container with `runc exec`, its stdio wired to the
//! session's streams. Without a TTY through pipes; with one through a pseudo-terminal of
//! ours that runc takes as its console and relays to the container's own pty (runc puts it
//! in raw mode, and on SIGWINCH copies its size to the container's). A client that goes
//! away gets its command killed, as containerd does.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::streams::{Outcome, Output, Streams, TermSize};
use crate::runtime::{self, OciRuntime, RuntimeError};

/// How long output may keep flowing once the command exited (a background child holding
/// the pipes must not hold the session open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// The ASCII end-of-transmission a terminal turns into end of input.
const EOT: u8 = 0x04;

/// Why an exec could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The pseudo-terminal could not be set up.
    #[error("setting up the terminal: {0}")]
    Pty(#[from] nix::Error),
    /// `runc exec` could not be started.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Waiting for it or registering the terminal with the reactor failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Runs `cmd` in the container `container_id` with the session's `streams` and reports
/// its end; `pid_file` receives the command's PID (and is removed afterwards).
pub async fn run(
    runtime: &OciRuntime,
    container_id: &str,
    cmd: &[String],
    tty: bool,
    pid_file: &Path,
    streams: Streams,
) -> Outcome {
    let outcome = match run_command(runtime, container_id, cmd, tty, pid_file, streams).await {
        Ok(code) => Outcome::Exited(code),
        Err(err) => Outcome::Failed(err.to_string()),
    };
    let _ = std::fs::remove_file(pid_file);
    outcome
}

async fn run_command(
    runtime: &OciRuntime,
    id: &str,
    cmd: &[String],
    tty: bool,
    pid_file: &Path,
    streams: Streams,
) -> Result<i32, ExecError> {
    let Streams {
        stdin,
        stdout,
        stderr,
        resize,
        mut client_gone,
    } = streams;
    let mut outputs = JoinSet::new();
    let mut inputs = JoinSet::new();
    let mut child = if tty {
        let (master, slave) = open_pty()?;
        let stdio = [
            Stdio::from(slave.try_clone()?),
            Stdio::from(slave.try_clone()?),
            Stdio::from(slave),
        ];
        let child = runtime.spawn_exec(id, cmd, true, pid_file, stdio)?;
        let master = PtyMaster::register(master)?;
        if let Some(out) = stdout {
            outputs.spawn(copy_out(master.clone(), out));
        }
        if let Some(rx) = stdin {
            inputs.spawn(copy_in(rx, master.clone(), Some(EOT)));
        }
        if let Some(rx) = resize {
            inputs.spawn(apply_resizes(rx, master, child.id()));
        }
        child
    } else {
        let pipe = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        let stdio = [
            pipe(stdin.is_some()),
            pipe(stdout.is_some()),
            pipe(stderr.is_some()),
        ];
        let mut child = runtime.spawn_exec(id, cmd, false, pid_file, stdio)?;
        if let (Some(rx), Some(w)) = (stdin, child.stdin.take()) {
            inputs.spawn(copy_in(rx, w, None));
        }
        if let (Some(out), Some(r)) = (stdout, child.stdout.take()) {
            outputs.spawn(copy_out(r, out));
        }
        if let (Some(out), Some(r)) = (stderr, child.stderr.take()) {
            outputs.spawn(copy_out(r, out));
        }
        child
    };
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = &mut client_gone => {
            tracing::info!(container_id = %id, "exec client went away, killing the command");
            runtime::kill_exec(&mut child, pid_file).await?
        }
    };
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        while outputs.join_next().await.is_some() {}
    });
    let _ = drained.await;
    outputs.shutdown().await;
    inputs.shutdown().await;
    Ok(runtime::exit_code(status))
}

/// Copies a command's output to its stream until end of file or the transport is gone.
async fn copy_out<R: AsyncRead + Unpin>(mut reader: R, out: Output) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n @ 1..) = reader.read(&mut buf).await {
        if !out.send(Bytes::copy_from_slice(&buf[..n])).await {
            return;
        }
    }
}

/// Copies input to the command; at its end closes the writer, or for a terminal writes
/// `eof` (there is no closing one end of a terminal).
async fn copy_in<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Bytes>,
    mut writer: W,
    eof: Option<u8>,
) {
    while let Some(data) = rx.recv().await {
        if writer.write_all(&data).await.is_err() {
            return;
        }
    }
    if let Some(byte) = eof {
        let _ = writer.write_all(&[byte]).await;
    }
    let _ = writer.shutdown().await;
}

/// Applies each size to our terminal and tells runc (`runc_pid`) to pass it on.
async fn apply_resizes(mut rx: mpsc::Receiver<TermSize>, master: PtyMaster, runc_pid: Option<u32>) {
    while let Some(size) = rx.recv().await {
        let winsize = rustix::termios::Winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        if let Err(err) = rustix::termios::tcsetwinsize(master.0.get_ref(), winsize) {
            tracing::warn!(%err, "resizing the exec terminal");
            continue;
        }
        if let Some(pid) = runc_pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGWINCH,
            );
        }
    }
}

/// A raw-mode pseudo-terminal: the non-blocking master, and the slave for runc's stdio.
fn open_pty() -> Result<(OwnedFd, OwnedFd), nix::Error> {
    let pty = nix::pty::openpty(None, None)?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    // Raw from the start: input written before runc set the mode must not be echoed here.
    let mut attrs = termios::tcgetattr(&pty.slave)?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs)?;
    let flags = OFlag::from_bits_truncate(fcntl(pty.master.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        pty.master.as_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    Ok((pty.master, pty.slave))
}

/// The master side of our pseudo-terminal as an async reader and writer. Reading ends
/// (EIO, reported as end of file) once every slave descriptor is closed, that is once runc
/// exited.
#[derive(Debug, Clone)]
struct PtyMaster(Arc<AsyncFd<OwnedFd>>);

impl PtyMaster {
    /// Registers the (non-blocking) master with the tokio reactor.
    #[allow(unsafe_code)]
    fn register(master: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same
        // for the AsyncFd's whole life, which is all `register` asks.
        let fd = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        Ok(Self(Arc::new(fd)))
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pty_is_raw_and_reads_end_when_the_slave_closes() {
        let (master, slave) = open_pty().unwrap();
        let mut master = PtyMaster::register(master).unwrap();
        let mut slave_file = std::fs::File::from(slave.try_clone().unwrap());
        master.write_all(b"typed\n").await.unwrap();
        std::io::Write::write_all(&mut slave_file, b"printed\n").unwrap();
        let mut got = vec![0u8; 64];
        let n = master.read(&mut got).await.unwrap();
        // Raw mode: no echo of "typed", no \n -> \r\n translation.
        assert_eq!(&got[..n], b"printed\n");
        drop((slave, slave_file));
        let mut rest = Vec::new();
        master.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
