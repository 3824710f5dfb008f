//! Free TCP ports for the servers tests start (OpenBao, the programs' metrics listeners).

use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Picks a free TCP port on 127.0.0.1, below the kernel's ephemeral range.
///
/// A port from `bind(0)` comes out of the ephemeral range (`net.ipv4.ip_local_port_range`,
/// 32768–60999 by default), the range every outgoing connection takes its source port from:
/// between this function returning and the server binding it, any test's client connection
/// can take it (seen with three test binaries at once: `bind: address already in use`).
/// Ports 20000–32767 lie outside that range, so only another caller of this function can race
/// for one; the walk through them starts at a point drawn from the pid and the clock, so
/// binaries running at once rarely meet, and each candidate is bound once to check it is free.
pub fn free_port() -> anyhow::Result<u16> {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos
    });
    for _ in 0..200 {
        // 7919 is prime and does not divide COUNT: successive calls visit every port once.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let offset = start.wrapping_add(n.wrapping_mul(7919)) % COUNT;
        let port = u16::try_from(FIRST + offset).unwrap_or(u16::MAX);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
