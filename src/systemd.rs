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
    /// `LISTEN_FDS`, `LISTEN_FDNAMES`): by name (`ingest`, `admin`), or in
    /// that order when none is named. None when the variables are absent or
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

/// The role of each of `count` passed sockets: by name, or by order only
/// when there are no names (`LISTEN_FDNAMES` unset, or every name empty or
/// systemd's "unknown" for a socket without `FileDescriptorName=`). Names
/// that are there but do not fit are an error, never a reason to guess.
fn roles(count: usize, names: Option<&[String]>) -> anyhow::Result<Vec<&'static str>> {
    anyhow::ensure!(
        count <= 2,
        "{count} sockets were passed (LISTEN_FDS); the relay takes at most two: \
         {INGEST_NAME:?} and {ADMIN_NAME:?}"
    );
    // No sockets for this process (`LISTEN_PID` names another): names left
    // in the environment are not ours either.
    if count == 0 {
        return Ok(Vec::new());
    }
    let names = names.filter(|names| {
        !names
            .iter()
            .all(|name| name.is_empty() || name == "unknown")
    });
    let Some(names) = names else {
        return Ok([INGEST_NAME, ADMIN_NAME].into_iter().take(count).collect());
    };
    anyhow::ensure!(
        names.len() == count,
        "{count} sockets were passed (LISTEN_FDS) but LISTEN_FDNAMES={:?} names {}",
        names.join(":"),
        names.len()
    );
    let roles: Vec<&'static str> = names
        .iter()
        .map(|name| match name.as_str() {
            INGEST_NAME => Ok(INGEST_NAME),
            ADMIN_NAME => Ok(ADMIN_NAME),
            _ => Err(anyhow::anyhow!(
                "a passed socket is named {name:?} (LISTEN_FDNAMES); the relay takes \
                 {INGEST_NAME:?} and {ADMIN_NAME:?} (FileDescriptorName= in the .socket unit)"
            )),
        })
        .collect::<anyhow::Result<_>>()?;
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
        assert_eq!(roles(1, Some(&names(&[""]))).unwrap(), vec![INGEST_NAME]);
        // Names meant for another process, which has the sockets.
        assert_eq!(
            roles(0, Some(&names(&["admin", "ingest"]))).unwrap(),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn names_that_do_not_fit_are_refused_instead_of_taken_in_order() {
        // Fewer names than sockets: which is which cannot be told, and a
        // guess could put the admin API on the public port.
        let err = roles(2, Some(&names(&["admin"]))).unwrap_err();
        assert!(err.to_string().contains("names 1"), "{err}");
        let err = roles(2, Some(&names(&["web", "metrics"]))).unwrap_err();
        assert!(err.to_string().contains("\"web\""), "{err}");
        let err = roles(2, Some(&names(&["admin", "unknown"]))).unwrap_err();
        assert!(err.to_string().contains("\"unknown\""), "{err}");
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
