//! Socket activation as systemd does it: listening sockets passed to a
//! child from fd 3 on, named, with `LISTEN_PID` set to the child's pid.

use std::process::Command;

use command_fds::{CommandFdExt, FdMapping};

/// `inner` run through `sh`, which sets `LISTEN_PID` to its own pid and
/// then becomes `inner` (exec keeps the pid), as systemd sets it.
pub fn with_listen_pid(inner: &Command) -> Command {
    let mut outer = Command::new("sh");
    outer
        .arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    outer
}

/// `listeners` passed to `command` as systemd passes them: from fd 3 on,
/// named.
pub fn pass_sockets(command: &mut Command, listeners: &[(&str, &std::net::TcpListener)]) {
    let names: Vec<&str> = listeners.iter().map(|(name, _)| *name).collect();
    command
        .env("LISTEN_FDS", listeners.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    let mappings = listeners
        .iter()
        .enumerate()
        .map(|(n, (_, listener))| FdMapping {
            parent_fd: listener.try_clone().unwrap().into(),
            child_fd: 3 + n as i32,
        })
        .collect();
    command.fd_mappings(mappings).unwrap();
}
