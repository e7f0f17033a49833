//! Kernel notifications: a deleted route or link of ours asks for a reconciliation pass; a
//! flipped sysctl of ours is put back at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::context::Context;
use crate::kernel::events::{self, NetconfDrift};

/// Asks for a repair pass whenever one of our routes or links is deleted, or notifications
/// were lost.
pub async fn run_kernel_monitor(ctx: Arc<Context>) {
    use netlink_sys::AsyncSocketExt;
    let socket = match events::kernel_events() {
        Ok(socket) => socket,
        Err(e) => {
            warn!(error = %e, "cannot watch kernel events; relying on periodic resync");
            return;
        }
    };
    let mut retiring = events::Retiring::default();
    let mut failures = 0u32;
    loop {
        let event = match socket.recv_from_full().await {
            Ok((datagram, _)) => {
                failures = 0;
                let tunnel = ctx.tunnel_index.load(Ordering::Relaxed);
                events::notices(&datagram)
                    .iter()
                    .filter_map(|n| retiring.classify(n, tunnel))
                    .last()
            }
            // Notifications were lost, a deletion among them maybe: a pass finds out.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                debug!("kernel notifications lost (socket overflow); a pass catches up");
                Some(events::KernelEvent::Lost)
            }
            // Anything else would repeat at once: said once, and read again after a pause
            // that grows to 5 s; meanwhile passes stand in for the notifications.
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(error = %e, "cannot read kernel notifications; retrying");
                }
                let pause = Duration::from_millis(100) * failures.min(50);
                tokio::time::sleep(pause).await;
                Some(events::KernelEvent::Lost)
            }
        };
        if event.is_some() {
            ctx.request_resync();
        }
    }
}

/// Puts back, within milliseconds, a flipped `ip_forward` (or IPv6's `all` forwarding) or a
/// flipped `proxy_arp`, `rp_filter`, `forwarding` or IPv6 `forwarding` or `proxy_ndp` of an
/// endpoint's veth, as the kernel announces the change.
pub async fn run_netconf_monitor(ctx: Arc<Context>) {
    use netlink_sys::AsyncSocketExt;
    let socket = match events::netconf_events() {
        Ok(socket) => socket,
        Err(e) => {
            warn!(error = %e, "cannot watch sysctl changes; relying on periodic resync");
            return;
        }
    };
    loop {
        let datagram = match socket.recv_from_full().await {
            Ok((datagram, _)) => datagram,
            Err(e) => {
                // ENOBUFS: notifications were lost; the next resync catches up. Anything
                // else would repeat at once, so pause before reading again.
                debug!(error = %e, "netconf socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for drift in events::parse_netconf(&datagram) {
            restore_sysctls(&ctx, drift).await;
        }
    }
}

async fn restore_sysctls(ctx: &Context, drift: NetconfDrift) {
    let (what, result) = match drift {
        NetconfDrift::HostForwarding => (
            "ip_forward".to_string(),
            ctx.kernel.configure_host(ctx.config.has_ipv6()),
        ),
        NetconfDrift::Link(index) => {
            let Ok(Some(name)) = ctx.kernel.link_name(index).await else {
                return;
            };
            // Only settled endpoints: an attach under way sets the veth's sysctls itself,
            // and a veth being detached no longer matters.
            let owner = ctx.endpoints.owner_of_link(&name);
            let Some(record) = owner
                .filter(|id| !ctx.endpoints.busy(id))
                .and_then(|id| ctx.endpoints.get(&id))
            else {
                return;
            };
            let result = ctx.kernel.configure_veth(&name, ctx.veth_has_ipv6(&record));
            (name, result)
        }
    };
    match result {
        Ok(0) => {}
        Ok(changed) => {
            ctx.metrics
                .repairs
                .fetch_add(changed as u64, Ordering::Relaxed);
            info!(%what, changed, "sysctls changed behind our back; restored");
        }
        Err(e) => warn!(%what, error = %e, "cannot restore sysctls"),
    }
}
