//! systemd's readiness protocol (`Type=notify`): `READY=1` once the data path
//! is attached and the configuration applied, `STOPPING=1` when shutting down,
//! `STATUS=` lines for `systemctl status`. Does nothing outside systemd
//! (no `NOTIFY_SOCKET`).

use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one.
/// Failures are logged, never fatal: the data path matters more than the report.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    };
    if let Err(e) = send() {
        tracing::warn!("telling systemd {state:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("kanari-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test alone reads NOTIFY_SOCKET in this process.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1\nSTATUS=attached");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=attached");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let _ = std::fs::remove_dir_all(&dir);
    }
}
