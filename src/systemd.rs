//! What systemd (or any manager speaking its protocols) hands the relay:
//! listening sockets passed in by socket activation, and the readiness
//! notifications it expects back.
//!
//! A passed socket stays open while the relay restarts, so a sender's
//! connection waits in the kernel's accept queue instead of being refused.
//! Nothing here binds a socket or reads the configuration.

use std::net::TcpListener;

use anyhow::Context;

/// The name (`FileDescriptorName=`) of the ingest socket.
pub const INGEST_NAME: &str = "ingest";
/// The name of the admin socket.
pub const ADMIN_NAME: &str = "admin";

/// Listening sockets passed in; a socket not passed is bound from the
/// configuration.
#[derive(Debug, Default)]
pub struct PassedListeners {
    pub ingest: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl PassedListeners {
    /// The sockets of the socket-passing protocol (`LISTEN_PID`,
    /// `LISTEN_FDS`, `LISTEN_FDNAMES`): by name (`ingest`, `admin`), or
    /// without names in that order. None when the variables are absent or
    /// meant for another process. A passed descriptor that is not a TCP
    /// listening socket, or a name the relay does not know, is an error:
    /// the unit file is wrong, and guessing would listen on the wrong port.
    pub fn from_env() -> anyhow::Result<PassedListeners> {
        let mut fds = listenfd::ListenFd::from_env();
        let names: Option<Vec<String>> = std::env::var("LISTEN_FDNAMES")
            .ok()
            .map(|names| names.split(':').map(str::to_owned).collect());
        let roles = roles(fds.len(), names.as_deref())?;
        let mut passed = PassedListeners::default();
        for (index, role) in roles.into_iter().enumerate() {
            let listener = fds
                .take_tcp_listener(index)
                .with_context(|| {
                    format!("passed socket {index} ({role}) is not a listening TCP socket")
                })?
                .with_context(|| format!("passed socket {index} ({role}) was taken already"))?;
            listener
                .set_nonblocking(true)
                .with_context(|| format!("passed socket {index} ({role})"))?;
            match role {
                INGEST_NAME => passed.ingest = Some(listener),
                _ => passed.admin = Some(listener),
            }
        }
        Ok(passed)
    }
}

/// The role of each of `count` passed sockets, from their names or, with
/// none, from their order.
fn roles(count: usize, names: Option<&[String]>) -> anyhow::Result<Vec<&'static str>> {
    let known = |name: &str| match name {
        INGEST_NAME => Some(INGEST_NAME),
        ADMIN_NAME => Some(ADMIN_NAME),
        _ => None,
    };
    let names =
        names.filter(|names| names.len() == count && names.iter().any(|n| known(n).is_some()));
    let roles: Vec<&'static str> = match names {
        Some(names) => names
            .iter()
            .map(|name| {
                known(name).with_context(|| {
                    format!(
                        "a passed socket is named {name:?} (LISTEN_FDNAMES); the relay takes \
                         {INGEST_NAME:?} and {ADMIN_NAME:?} (FileDescriptorName= in the .socket unit)"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
        None => [INGEST_NAME, ADMIN_NAME].into_iter().take(count).collect(),
    };
    anyhow::ensure!(
        count <= 2,
        "{count} sockets were passed (LISTEN_FDS); the relay takes at most two: \
         {INGEST_NAME:?} and {ADMIN_NAME:?}"
    );
    for role in [INGEST_NAME, ADMIN_NAME] {
        anyhow::ensure!(
            roles.iter().filter(|r| **r == role).count() <= 1,
            "two passed sockets are named {role:?} (LISTEN_FDNAMES)"
        );
    }
    Ok(roles)
}

/// Tells the service manager the relay is ready: its log is open and
/// replayed, and it answers on its listeners. Nothing without
/// `NOTIFY_SOCKET`.
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Tells the service manager the relay is stopping.
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sockets_are_taken_by_name_or_in_order() {
        assert_eq!(roles(0, None).unwrap(), Vec::<&str>::new());
        assert_eq!(roles(1, None).unwrap(), vec![INGEST_NAME]);
        assert_eq!(roles(2, None).unwrap(), vec![INGEST_NAME, ADMIN_NAME]);
        assert_eq!(
            roles(2, Some(&names(&["admin", "ingest"]))).unwrap(),
            vec![ADMIN_NAME, INGEST_NAME]
        );
        assert_eq!(
            roles(1, Some(&names(&["admin"]))).unwrap(),
            vec![ADMIN_NAME]
        );
        // systemd names unnamed sockets "unknown": the order decides.
        assert_eq!(
            roles(2, Some(&names(&["unknown", "unknown"]))).unwrap(),
            vec![INGEST_NAME, ADMIN_NAME]
        );
    }

    #[test]
    fn wrong_names_and_counts_are_refused_saying_why() {
        let err = roles(2, Some(&names(&["ingest", "metrics"]))).unwrap_err();
        assert!(err.to_string().contains("\"metrics\""), "{err}");
        let err = roles(2, Some(&names(&["ingest", "ingest"]))).unwrap_err();
        assert!(err.to_string().contains("two passed sockets"), "{err}");
        let err = roles(3, None).unwrap_err();
        assert!(err.to_string().contains("at most two"), "{err}");
    }
}
