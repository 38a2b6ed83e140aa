//! The app as announce's child: started, sent the signals announce receives, reaped (with
//! any orphans of its tree, since announce is a subreaper and often PID 1 in a container),
//! and its end turned into an exit status.

use std::io;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::signal::unix::{signal, SignalKind};

/// The signals announce passes on to the app. SIGTERM and SIGINT also stop announce.
const FORWARDED: [(SignalKind, Signal); 6] = [
    (SignalKind::terminate(), Signal::TERM),
    (SignalKind::interrupt(), Signal::INT),
    (SignalKind::hangup(), Signal::HUP),
    (SignalKind::quit(), Signal::QUIT),
    (SignalKind::user_defined1(), Signal::USR1),
    (SignalKind::user_defined2(), Signal::USR2),
];

/// What [`Signals::recv`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// SIGTERM or SIGINT: deregister, then pass it on and wait for the app.
    Stop(Signal),
    /// SIGHUP, SIGQUIT, SIGUSR1 or SIGUSR2: pass it on.
    Forward(Signal),
    /// SIGCHLD: some child changed state.
    Child,
}

/// Announce's signal handlers, installed before the app starts so that none is missed.
#[derive(Debug)]
pub struct Signals {
    forwarded: Vec<(tokio::signal::unix::Signal, Signal)>,
    child: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (the app gets default dispositions back when it executes).
    pub fn new() -> io::Result<Signals> {
        let forwarded = FORWARDED
            .iter()
            .map(|&(kind, sig)| Ok((signal(kind)?, sig)))
            .collect::<io::Result<_>>()?;
        Ok(Signals {
            forwarded,
            child: signal(SignalKind::child())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Received {
        let forwarded = std::future::poll_fn(|cx| {
            for (stream, sig) in &mut self.forwarded {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            sig = forwarded => {
                if sig == Signal::TERM || sig == Signal::INT {
                    Received::Stop(sig)
                } else {
                    Received::Forward(sig)
                }
            }
            _ = self.child.recv() => Received::Child,
        }
    }
}

/// How the app ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
}

impl Ended {
    /// The exit status announce takes on: the app's code, or 128 + the signal, as a shell
    /// reports it.
    pub fn exit_code(self) -> u8 {
        let code = match self {
            Ended::Exited(c) => c,
            Ended::Killed(s) => 128 + s,
        };
        u8::try_from(code & 0xff).unwrap_or(u8::MAX)
    }
}

/// The app could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {command}: {source}")]
pub struct SpawnError {
    /// The command.
    pub command: String,
    /// The cause.
    pub source: io::Error,
}

impl SpawnError {
    /// The exit status, as shells give it: 127 when the command is not found, 126 when it
    /// cannot be executed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.source.kind() {
            io::ErrorKind::NotFound => 127,
            io::ErrorKind::PermissionDenied => 126,
            _ => 1,
        }
    }
}

/// The running app.
#[derive(Debug)]
pub struct App {
    pid: Pid,
    ended: Option<Ended>,
}

impl App {
    /// Makes announce a subreaper (orphans of the app's tree become its children, so they
    /// are measured and reaped), then starts `command` with announce's standard streams and
    /// environment.
    pub fn spawn(command: &[String]) -> Result<App, SpawnError> {
        let err = |source| SpawnError {
            command: command.join(" "),
            source,
        };
        let (program, args) = command
            .split_first()
            .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no command")))?;
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::debug!("cannot become a subreaper: {e}");
        }
        let child = std::process::Command::new(program)
            .args(args)
            .spawn()
            .map_err(err)?;
        // Reaped by `reap` (waitpid on any child), not through the handle, which is dropped
        // without waiting.
        let pid = Pid::from_child(&child);
        Ok(App { pid, ended: None })
    }

    /// The app's process ID.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw_nonzero().get()
    }

    /// Sends `sig` to the app, unless it has ended.
    pub fn signal(&self, sig: Signal) {
        if self.ended.is_some() {
            return;
        }
        if let Err(e) = rustix::process::kill_process(self.pid, sig) {
            tracing::debug!("cannot send signal {} to the app: {e}", sig.as_raw());
        }
    }

    /// Reaps every child that has ended (orphans adopted as subreaper included); how the
    /// app ended, once it has.
    pub fn reap(&mut self) -> Option<Ended> {
        while self.ended.is_none() {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if pid != self.pid {
                        continue;
                    }
                    if let Some(code) = status.exit_status() {
                        self.ended = Some(Ended::Exited(code));
                    } else if let Some(sig) = status.terminating_signal() {
                        self.ended = Some(Ended::Killed(sig));
                    }
                }
                // Nothing more has ended (or no child is left).
                Ok(None) | Err(_) => break,
            }
        }
        self.ended
    }

    /// Waits for the app to end, passing on every signal meanwhile.
    pub async fn wait(&mut self, signals: &mut Signals) -> Ended {
        // SIGCHLD wakes the loop; the tick only guards against a wake-up lost to a race.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            if let Some(ended) = self.reap() {
                return ended;
            }
            tokio::select! {
                r = signals.recv() => match r {
                    Received::Stop(sig) | Received::Forward(sig) => self.signal(sig),
                    Received::Child => {}
                },
                _ = tick.tick() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Ended::Exited(0).exit_code(), 0);
        assert_eq!(Ended::Exited(3).exit_code(), 3);
        assert_eq!(Ended::Killed(15).exit_code(), 143);
        assert_eq!(Ended::Killed(9).exit_code(), 137);
        let missing = App::spawn(&["/nonexistent/app".into()]).unwrap_err();
        assert_eq!(missing.exit_code(), 127);
        assert!(
            missing.to_string().contains("/nonexistent/app"),
            "{missing}"
        );
    }
}
