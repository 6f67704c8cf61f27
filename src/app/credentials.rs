//! The secrets a relay runs with, and the checks that refuse to start
//! without the ones the configuration needs. Never reads flags or the
//! environment, and never logs a secret.

use std::net::SocketAddr;

use crate::config::{Config, Secret};
use crate::systemd::PassedListeners;

/// The secrets a relay runs with, resolved by the caller (never from flags).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The secret LeadFloAgent sends; `None` only in unauthenticated mode.
    pub inbound: Option<Secret>,
    /// The previous secret, still accepted while a rotation is under way.
    pub previous_inbound: Option<Secret>,
    /// The admin API's bearer token; required when the admin listener
    /// (bound to `admin_listen`, or passed by systemd) is not on a loopback
    /// address.
    pub admin_token: Option<Secret>,
}

/// Where a listener's socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOrigin {
    /// Bound by the relay to the configured address.
    Configured,
    /// Passed in by systemd (socket activation): the configured address is
    /// ignored, and the socket's own address counts.
    Passed,
}

/// The admin API may go without a token only when `addr`, where its
/// listener really listens, is a loopback address.
pub fn require_admin_token(
    addr: SocketAddr,
    origin: SocketOrigin,
    token: Option<&Secret>,
) -> anyhow::Result<()> {
    if token.is_some() || addr.ip().is_loopback() {
        return Ok(());
    }
    let (what, instead) = match origin {
        SocketOrigin::Configured => (
            format!("server.admin_listen = {addr}"),
            "listen on 127.0.0.1",
        ),
        SocketOrigin::Passed => (
            format!(
                "the admin socket passed by systemd (socket activation; server.admin_listen \
                 is ignored for it) listens on {addr}, which"
            ),
            "make the admin socket listen on 127.0.0.1 (ListenStream= in its .socket unit)",
        ),
    };
    anyhow::bail!(
        "{what} is not a loopback address, so the admin API needs a token: set {} \
         (clients send it as Authorization: Bearer <token>), or {instead}",
        crate::admin::ADMIN_TOKEN_ENV
    )
}

/// Refuses to start without an inbound secret unless unauthenticated mode
/// was asked for, or with an admin API off loopback and without a token.
pub(super) fn check_credentials(
    config: &Config,
    credentials: &Credentials,
    passed: &PassedListeners,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        credentials.inbound.is_some() || config.auth.allow_unauthenticated,
        "no inbound secret configured and unauthenticated mode was not asked for"
    );
    // Whether the admin API may go without a token depends on the address
    // it really listens on, which for a socket passed by systemd is not
    // `server.admin_listen`.
    let (admin_addr, admin_origin) = match &passed.admin {
        Some(socket) => (socket.local_addr()?, SocketOrigin::Passed),
        None => (config.server.admin_listen, SocketOrigin::Configured),
    };
    require_admin_token(admin_addr, admin_origin, credentials.admin_token.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_api_needs_a_token_off_loopback_wherever_its_socket_came_from() {
        let token = Secret::new("admin-token");
        let loopback: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        for origin in [SocketOrigin::Configured, SocketOrigin::Passed] {
            assert!(require_admin_token(loopback, origin, None).is_ok());
            assert!(require_admin_token(public, origin, Some(&token)).is_ok());
            let err = require_admin_token(public, origin, None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("0.0.0.0:9090") && err.contains(crate::admin::ADMIN_TOKEN_ENV),
                "{origin:?}: {err}"
            );
        }
        let passed = require_admin_token(public, SocketOrigin::Passed, None)
            .unwrap_err()
            .to_string();
        assert!(passed.contains("passed by systemd"), "{passed}");
        let configured = require_admin_token(public, SocketOrigin::Configured, None)
            .unwrap_err()
            .to_string();
        assert!(
            configured.contains("server.admin_listen = 0.0.0.0:9090"),
            "{configured}"
        );
    }
}
