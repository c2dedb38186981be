//! The monitor's event loop once the container exists: the container's output (two pipes, or
//! its terminal's master) goes to the CRI log and to every attach session as it arrives;
//! session input goes to the container's stdin (a pipe, or the terminal), resizes to the
//! terminal; orphans are reaped. Nothing here waits on a client: input is buffered and
//! written when the container reads, a session that cannot take output at once is dropped,
//! so the container never blocks on the monitor and logs continue with no one attached.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustix::net::{RecvFlags, SendFlags, SocketFlags};

use crate::attach_socket::{self, ClientMessage, MAX_PACKET};
use crate::logs::{LogWriter, Stream};
use crate::streaming::channel::ids;

/// How long output may keep flowing after the init process exited (a daemonised child
/// holding the pipes open must not keep the container "running").
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Input buffered for the container beyond which sessions are not read (back-pressure).
const MAX_PENDING_INPUT: usize = 256 * 1024;

/// The ASCII end-of-transmission: on a terminal, the end of input.
const EOT: u8 = 0x04;

/// The container's side of its stdio as the monitor holds it.
#[derive(Debug)]
pub enum ContainerIo {
    /// Pipes: the read ends of stdout and stderr, and the write end of stdin if it has one.
    Pipes {
        /// Read end of the container's stdout.
        stdout: OwnedFd,
        /// Read end of the container's stderr.
        stderr: OwnedFd,
        /// Write end of the container's stdin.
        stdin: Option<OwnedFd>,
    },
    /// The master of the container's terminal: its output, its input, its size.
    Terminal(OwnedFd),
}

/// Where session input goes: the stdin pipe or the terminal, with what the container has
/// not read yet.
#[derive(Debug)]
struct StdinSink {
    fd: OwnedFd,
    pending: Vec<u8>,
    /// Closed (stdin_once): dropped once `pending` is written.
    closing: bool,
}

/// One connected attach client.
#[derive(Debug)]
struct Session {
    conn: OwnedFd,
    /// It sent stdin, so its end counts as the end of stdin for `stdin_once`.
    had_stdin: bool,
    /// It said its stdin ended.
    stdin_ended: bool,
    /// It closed or failed: removed at the end of the round.
    gone: bool,
}

/// One output stream of the container.
#[derive(Debug)]
struct Output {
    fd: OwnedFd,
    stream: Stream,
    /// End of file seen: removed at the end of the round.
    done: bool,
}

/// What the loop watches besides the signals.
#[derive(Debug)]
pub struct Relay {
    outputs: Vec<Output>,
    stdin: Option<StdinSink>,
    terminal: Option<OwnedFd>,
    listener: Option<OwnedFd>,
    sessions: Vec<Session>,
    stdin_once: bool,
}

/// What one poll round found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Signals,
    Output(usize),
    Listener,
    Session(usize),
    Stdin,
}

impl Relay {
    /// Relays `io`, serving attach sessions on `listener`; with `stdin_once` the container's
    /// stdin is closed when the first session that had stdin ends.
    pub fn new(
        io: ContainerIo,
        listener: Option<OwnedFd>,
        stdin_once: bool,
    ) -> std::io::Result<Self> {
        let (outputs, stdin, terminal) = match io {
            ContainerIo::Pipes {
                stdout,
                stderr,
                stdin,
            } => (
                vec![
                    output(stdout, Stream::Stdout),
                    output(stderr, Stream::Stderr),
                ],
                stdin,
                None,
            ),
            ContainerIo::Terminal(master) => {
                let input = master.try_clone()?;
                let resize = master.try_clone()?;
                (
                    vec![output(master, Stream::Stdout)],
                    Some(input),
                    Some(resize),
                )
            }
        };
        let stdin = match stdin {
            Some(fd) => {
                set_nonblocking(&fd)?;
                Some(StdinSink {
                    fd,
                    pending: Vec::new(),
                    closing: false,
                })
            }
            None => None,
        };
        Ok(Self {
            outputs,
            stdin,
            terminal,
            listener,
            sessions: Vec::new(),
            stdin_once,
        })
    }

    /// Runs until the init process `pid` exited and the output closed (or
    /// [`DRAIN_AFTER_EXIT`] passed), reaping every orphan meanwhile; SIGUSR1 reopens the log.
    /// Returns init's wait status. Sessions are closed on return.
    pub fn run(mut self, pid: i32, signals: &SignalFd, log: &mut LogWriter) -> WaitStatus {
        let mut exit: Option<(WaitStatus, Instant)> = None;
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            if let Some((status, at)) = exit {
                if self.outputs.is_empty() || at.elapsed() >= DRAIN_AFTER_EXIT {
                    for s in [Stream::Stdout, Stream::Stderr] {
                        let _ = log.finish(s);
                    }
                    self.close_sessions();
                    return status;
                }
            }
            let timeout = match exit {
                Some((_, at)) => {
                    PollTimeout::try_from(DRAIN_AFTER_EXIT.saturating_sub(at.elapsed()))
                        .unwrap_or(PollTimeout::ZERO)
                }
                None => PollTimeout::NONE,
            };
            for source in self.poll(signals, timeout) {
                match source {
                    Source::Output(i) => self.on_output(i, &mut buf, log),
                    Source::Listener => self.accept(),
                    Source::Session(i) => self.on_session(i, &mut buf),
                    Source::Stdin => self.flush_stdin(),
                    Source::Signals => {
                        while let Ok(Some(info)) = signals.read_signal() {
                            if info.ssi_signo == Signal::SIGUSR1 as u32 {
                                if let Err(e) = log.reopen() {
                                    eprintln!("reopening container log: {e}");
                                }
                            }
                            if info.ssi_signo == Signal::SIGCHLD as u32 {
                                reap(pid, &mut exit);
                            }
                        }
                    }
                }
            }
            self.end_round();
        }
    }

    /// Closes every session after reading what it sent: closing with input unread would
    /// reset the connection, and the client would lose output still queued for it.
    fn close_sessions(&mut self) {
        let mut buf = [0u8; MAX_PACKET];
        for s in self.sessions.drain(..) {
            while let Ok((1.., _)) = rustix::net::recv(&s.conn, &mut buf[..], RecvFlags::DONTWAIT) {
            }
        }
    }

    /// Drops finished outputs and gone sessions; a gone session that had stdin ends it.
    fn end_round(&mut self) {
        self.outputs.retain(|o| !o.done);
        let mut ended = false;
        self.sessions.retain(|s| {
            ended |= s.gone && s.had_stdin && !s.stdin_ended;
            !s.gone
        });
        if ended {
            self.stdin_ended();
        }
    }

    /// Waits for readiness; returns the ready sources.
    fn poll(&self, signals: &SignalFd, timeout: PollTimeout) -> Vec<Source> {
        let mut watched: Vec<(Source, BorrowedFd<'_>, PollFlags)> =
            vec![(Source::Signals, signals.as_fd(), PollFlags::POLLIN)];
        for (i, o) in self.outputs.iter().enumerate() {
            watched.push((Source::Output(i), o.fd.as_fd(), PollFlags::POLLIN));
        }
        if let Some(l) = &self.listener {
            watched.push((Source::Listener, l.as_fd(), PollFlags::POLLIN));
        }
        if let Some(sink) = self.stdin.as_ref().filter(|s| !s.pending.is_empty()) {
            watched.push((Source::Stdin, sink.fd.as_fd(), PollFlags::POLLOUT));
        }
        let input_room = self
            .stdin
            .as_ref()
            .is_none_or(|s| s.pending.len() < MAX_PENDING_INPUT);
        if input_room {
            for (i, s) in self.sessions.iter().enumerate() {
                watched.push((Source::Session(i), s.conn.as_fd(), PollFlags::POLLIN));
            }
        }
        let mut fds: Vec<PollFd<'_>> = watched
            .iter()
            .map(|(_, fd, flags)| PollFd::new(*fd, *flags))
            .collect();
        if poll(&mut fds, timeout).is_err() {
            return Vec::new();
        }
        fds.iter()
            .zip(&watched)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, (source, _, _))| *source)
            .collect()
    }

    /// Reads one chunk of output: to the log and to every session. End of file (or EIO, a
    /// terminal whose last holder closed it) ends that output.
    fn on_output(&mut self, i: usize, buf: &mut [u8], log: &mut LogWriter) {
        let Some(output) = self.outputs.get_mut(i) else {
            return;
        };
        let stream = output.stream;
        // One byte stays free for the channel number.
        match nix::unistd::read(&output.fd, &mut buf[..MAX_PACKET - 1]) {
            Ok(0) => {}
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return,
            Err(_) => {}
            Ok(n) => {
                if let Err(e) = log.write(stream, &buf[..n]) {
                    eprintln!("writing container log: {e}");
                }
                let channel = match stream {
                    Stream::Stdout => ids::STDOUT,
                    Stream::Stderr => ids::STDERR,
                };
                let packet = [&[channel][..], &buf[..n]].concat();
                for s in self.sessions.iter_mut().filter(|s| !s.gone) {
                    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
                    if let Err(e) = rustix::net::send(&s.conn, &packet, flags) {
                        eprintln!("dropping an attach session that cannot take output: {e}");
                        s.gone = true;
                    }
                }
                return;
            }
        }
        let _ = log.finish(stream);
        output.done = true;
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        while let Ok(conn) = rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            self.sessions.push(Session {
                conn,
                had_stdin: false,
                stdin_ended: false,
                gone: false,
            });
        }
    }

    /// Handles one packet from session `i`; its end (or an error) marks it gone.
    fn on_session(&mut self, i: usize, buf: &mut [u8]) {
        let Some(session) = self.sessions.get_mut(i).filter(|s| !s.gone) else {
            return;
        };
        let n = match rustix::net::recv(&session.conn, &mut *buf, RecvFlags::DONTWAIT) {
            Ok((n @ 1.., _)) => n,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return,
            _ => {
                session.gone = true;
                return;
            }
        };
        match attach_socket::decode_client(&buf[..n]) {
            Some(ClientMessage::Stdin(data)) => {
                session.had_stdin = true;
                if let Some(sink) = self.stdin.as_mut().filter(|s| !s.closing) {
                    sink.pending.extend_from_slice(data);
                }
            }
            Some(ClientMessage::StdinEnd) => {
                session.had_stdin = true;
                session.stdin_ended = true;
                self.stdin_ended();
            }
            Some(ClientMessage::Resize(size)) => {
                if let Some(terminal) = &self.terminal {
                    let winsize = rustix::termios::Winsize {
                        ws_row: size.height,
                        ws_col: size.width,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    if let Err(e) = rustix::termios::tcsetwinsize(terminal, winsize) {
                        eprintln!("resizing the container's terminal: {e}");
                    }
                }
            }
            None => {}
        }
    }

    /// A session's stdin ended: with `stdin_once` the container's stdin closes (a terminal
    /// gets end-of-transmission, which ends a reader's input).
    fn stdin_ended(&mut self) {
        if !self.stdin_once {
            return;
        }
        if let Some(sink) = self.stdin.as_mut().filter(|s| !s.closing) {
            if self.terminal.is_some() {
                sink.pending.push(EOT);
            }
            sink.closing = true;
            self.flush_stdin();
        }
    }

    /// Writes what the container can take of the pending input; a broken stdin or a closed
    /// one with nothing pending is dropped.
    fn flush_stdin(&mut self) {
        let Some(sink) = self.stdin.as_mut() else {
            return;
        };
        while !sink.pending.is_empty() {
            match nix::unistd::write(&sink.fd, &sink.pending) {
                Ok(n) => {
                    sink.pending.drain(..n);
                }
                Err(nix::Error::EAGAIN) => return,
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    eprintln!("writing the container's stdin: {e}");
                    self.stdin = None;
                    return;
                }
            }
        }
        if sink.closing {
            self.stdin = None;
        }
    }
}

fn output(fd: OwnedFd, stream: Stream) -> Output {
    Output {
        fd,
        stream,
        done: false,
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn reap(init: i32, exit: &mut Option<(WaitStatus, Instant)>) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if status.pid() == Some(Pid::from_raw(init)) {
                    *exit = Some((status, Instant::now()));
                }
            }
        }
    }
}
