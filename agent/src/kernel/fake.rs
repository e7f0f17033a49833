//! An in-memory kernel for unit tests of the logic above the kernel seam: links, routes,
//! namespaces and the interfaces inside them, with failures injectable per step. It models what
//! that logic relies on (a deleted namespace takes its veths with it; a retired link is out of
//! service), not the kernel's every rule.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::{
    ContainerLink, InsideCheck, Kernel, KernelError, NetnsError, NetnsId, Result, TunnelState,
    Underlay, VxlanDevice,
};
use crate::model::{IfName, Mac, Protocol, Route, RouteTarget};

/// A step that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Creating the veth pair.
    CreateVeth,
    /// Configuring the container side, after the pair exists.
    ConfigureInside,
    /// Wiring the IPv6 address of a dual-stack container (its container side and host route),
    /// after its IPv4 part.
    WireV6,
    ReplaceRoute,
    DeleteRoute,
    DeleteLink,
    RetireLink,
    CreateNetns,
    DeleteNetns,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    pub index: u32,
    pub retired: bool,
    /// The namespace of the container end and its name there.
    pub netns: String,
    pub peer: IfName,
}

#[derive(Debug, Default)]
pub struct FakeState {
    next_index: u32,
    pub links: BTreeMap<String, FakeLink>,
    pub routes: BTreeSet<Route>,
    /// Namespaces by path, with the interfaces inside and their address.
    pub namespaces: BTreeMap<String, BTreeMap<IfName, IpAddr>>,
    /// Namespaces the agent created.
    pub owned: BTreeSet<String>,
    /// Host sockets listening, by protocol and port.
    pub listening: BTreeSet<(Protocol, u16)>,
    /// The VXLAN device, as last made, with its entries.
    pub tunnel: Option<(VxlanDevice, TunnelState)>,
    /// How many times all links were listed (a dump: the costly read with many veths).
    pub link_dumps: usize,
    /// How many of those dumps kept the links' settings (`links_with_settings`).
    pub settings_dumps: usize,
}

#[derive(Debug, Default)]
pub struct FakeKernel {
    pub state: Mutex<FakeState>,
    failing: Mutex<HashSet<Step>>,
}

fn injected(step: Step) -> KernelError {
    KernelError::Io {
        what: format!("injected failure at {step:?}"),
        source: io::Error::other("injected"),
    }
}

impl FakeKernel {
    /// A kernel with these namespaces present (as if made by a runtime).
    pub fn with_namespaces(paths: &[&str]) -> Self {
        let kernel = Self::default();
        for path in paths {
            kernel.add_namespace(path);
        }
        kernel
    }

    pub fn add_namespace(&self, path: &str) {
        self.state
            .lock()
            .unwrap()
            .namespaces
            .insert(path.to_string(), BTreeMap::new());
    }

    /// Makes `step` fail from now on.
    pub fn fail(&self, step: Step) {
        self.failing.lock().unwrap().insert(step);
    }

    pub fn heal(&self, step: Step) {
        self.failing.lock().unwrap().remove(&step);
    }

    fn check(&self, step: Step) -> Result<()> {
        match self.failing.lock().unwrap().contains(&step) {
            true => Err(injected(step)),
            false => Ok(()),
        }
    }

    /// Removes a namespace as a runtime would; its veths go with it.
    pub fn remove_namespace(&self, path: &str) {
        let mut state = self.state.lock().unwrap();
        state.namespaces.remove(path);
        state.owned.remove(path);
        let gone: Vec<String> = state
            .links
            .iter()
            .filter(|(_, l)| l.netns == path)
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            remove_link(&mut state, &name);
        }
    }
}

fn remove_link(state: &mut FakeState, name: &str) -> bool {
    let Some(link) = state.links.remove(name) else {
        return false;
    };
    state
        .routes
        .retain(|r| r.target != RouteTarget::Dev(link.index));
    if let Some(inside) = state.namespaces.get_mut(&link.netns) {
        inside.remove(&link.peer);
    }
    true
}

#[async_trait]
impl Kernel for FakeKernel {
    async fn underlay(&self, ifname: Option<&str>) -> Result<Underlay, String> {
        Ok(Underlay {
            ifname: ifname.unwrap_or("eth0").to_string(),
            index: 2,
            ip: "198.51.100.1".parse().unwrap(),
            prefix: 24,
            ipv6: Some("2001:db8:100::1".parse().unwrap()),
            mtu: 1500,
        })
    }

    fn configure_host(&self, _ipv6: bool) -> io::Result<usize> {
        Ok(0)
    }

    async fn links(&self) -> Result<BTreeMap<String, u32>> {
        let mut state = self.state.lock().unwrap();
        state.link_dumps += 1;
        Ok(state
            .links
            .iter()
            .filter(|(_, l)| !l.retired)
            .map(|(n, l)| (n.clone(), l.index))
            .collect())
    }

    async fn links_with_settings(&self) -> Result<BTreeMap<String, u32>> {
        self.state.lock().unwrap().settings_dumps += 1;
        self.links().await
    }

    async fn link_name(&self, index: u32) -> Result<Option<String>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .links
            .iter()
            .find(|(_, l)| l.index == index)
            .map(|(n, _)| n.clone()))
    }

    async fn peer_elsewhere(&self, name: &str) -> Result<bool> {
        // Every fake link is a container's veth.
        Ok(self.state.lock().unwrap().links.contains_key(name))
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.check(Step::DeleteLink)?;
        Ok(remove_link(&mut self.state.lock().unwrap(), name))
    }

    async fn retire_link(&self, name: &str, ip: IpAddr) -> Result<bool> {
        self.check(Step::RetireLink)?;
        let mut state = self.state.lock().unwrap();
        let Some(index) = state.links.get(name).map(|l| l.index) else {
            return Ok(false);
        };
        state
            .routes
            .remove(&Route::host(ip, RouteTarget::Dev(index)));
        // The reaper deletes retired links soon; the fake does it at once.
        remove_link(&mut state, name);
        Ok(true)
    }

    fn configure_veth(&self, _name: &str, _ipv6: bool) -> io::Result<usize> {
        Ok(0)
    }

    async fn routes(&self) -> Result<Vec<Route>> {
        Ok(self.state.lock().unwrap().routes.iter().copied().collect())
    }

    async fn replace_route(&self, route: &Route) -> Result<()> {
        self.check(Step::ReplaceRoute)?;
        let mut state = self.state.lock().unwrap();
        state.routes.retain(|r| r.dst != route.dst);
        state.routes.insert(*route);
        Ok(())
    }

    async fn delete_route(&self, route: &Route) -> Result<()> {
        self.check(Step::DeleteRoute)?;
        self.state.lock().unwrap().routes.remove(route);
        Ok(())
    }

    async fn tunnel(&self, wanted: Option<&VxlanDevice>) -> Result<Option<TunnelState>> {
        let state = self.state.lock().unwrap();
        Ok(state.tunnel.as_ref().map(|(device, tunnel)| TunnelState {
            matches: Some(device) == wanted,
            ..tunnel.clone()
        }))
    }

    async fn ensure_tunnel(&self, wanted: &VxlanDevice) -> Result<u32> {
        let mut state = self.state.lock().unwrap();
        if let Some((device, tunnel)) = &state.tunnel {
            if device == wanted {
                return Ok(tunnel.index);
            }
        }
        state.next_index += 1;
        let index = state.next_index + 100;
        let tunnel = TunnelState {
            index,
            ..Default::default()
        };
        state.tunnel = Some((wanted.clone(), tunnel));
        Ok(index)
    }

    async fn delete_tunnel(&self) -> Result<bool> {
        let mut state = self.state.lock().unwrap();
        let index = state.tunnel.take().map(|(_, t)| t.index);
        state
            .routes
            .retain(|r| !matches!(r.target, RouteTarget::Onlink { dev, .. } if Some(dev) == index));
        Ok(index.is_some())
    }

    async fn tunnel_neighbour(&self, index: u32, ip: IpAddr, mac: Mac, add: bool) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let tunnel = state.tunnel.as_mut().filter(|(_, t)| t.index == index);
        let (_, tunnel) = tunnel.ok_or_else(|| injected(Step::ReplaceRoute))?;
        match add {
            true => {
                tunnel.neighbours.retain(|(other, _)| *other != ip);
                tunnel.neighbours.insert((ip, mac));
            }
            false => {
                tunnel.neighbours.remove(&(ip, mac));
            }
        }
        Ok(())
    }

    async fn tunnel_fdb(&self, index: u32, mac: Mac, dst: IpAddr, add: bool) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let tunnel = state.tunnel.as_mut().filter(|(_, t)| t.index == index);
        let (_, tunnel) = tunnel.ok_or_else(|| injected(Step::ReplaceRoute))?;
        match add {
            true => {
                tunnel.fdb.insert((mac, dst));
            }
            false => {
                tunnel.fdb.remove(&(mac, dst));
            }
        }
        Ok(())
    }

    fn listening(&self, protocol: Protocol, port: u16) -> io::Result<bool> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .listening
            .contains(&(protocol, port)))
    }

    fn vet_netns(&self, path: &str) -> Result<NetnsId, NetnsError> {
        let state = self.state.lock().unwrap();
        let position = state
            .namespaces
            .keys()
            .position(|p| p == path)
            .ok_or_else(|| NetnsError::Missing { path: path.into() })?;
        Ok(NetnsId {
            dev: 4,
            ino: position as u64 + 1,
        })
    }

    async fn create_netns(&self, name: &str) -> Result<String, NetnsError> {
        let path = format!("/run/netns/{name}");
        if self.check(Step::CreateNetns).is_err() {
            return Err(NetnsError::Create {
                path,
                source: io::Error::other("injected"),
            });
        }
        self.remove_namespace(&path);
        let mut state = self.state.lock().unwrap();
        state.namespaces.insert(path.clone(), BTreeMap::new());
        state.owned.insert(path.clone());
        Ok(path)
    }

    fn named_namespaces(&self, prefix: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let full = format!("/run/netns/{prefix}");
        state
            .namespaces
            .keys()
            .filter(|p| p.starts_with(&full))
            .cloned()
            .collect()
    }

    fn delete_netns(&self, path: &str) -> io::Result<()> {
        if self.check(Step::DeleteNetns).is_err() {
            return Err(io::Error::other("injected"));
        }
        self.remove_namespace(path);
        Ok(())
    }

    async fn wire(&self, netns: &str, link: &ContainerLink) -> Result<u32> {
        self.check(Step::CreateVeth)?;
        let index = {
            let mut state = self.state.lock().unwrap();
            let inside = state
                .namespaces
                .get(netns)
                .ok_or_else(|| NetnsError::Missing { path: netns.into() })?;
            if state.links.contains_key(&link.host_ifname) || inside.contains_key(&link.ifname) {
                return Err(KernelError::Exists {
                    host_ifname: link.host_ifname.clone(),
                    ifname: link.ifname.to_string(),
                    netns: netns.to_string(),
                });
            }
            state.next_index += 1;
            let index = state.next_index + 100;
            state.links.insert(
                link.host_ifname.clone(),
                FakeLink {
                    index,
                    retired: false,
                    netns: netns.to_string(),
                    peer: link.ifname.clone(),
                },
            );
            index
        };
        self.rewire_inside(netns, link).await?;
        self.replace_route(&Route::host(link.ip, RouteTarget::Dev(index)))
            .await?;
        if let Some(ipv6) = link.ipv6 {
            self.check(Step::WireV6)?;
            self.replace_route(&Route::host(ipv6, RouteTarget::Dev(index)))
                .await?;
        }
        Ok(index)
    }

    async fn rewire_inside(&self, netns: &str, link: &ContainerLink) -> Result<()> {
        self.check(Step::ConfigureInside)?;
        let mut state = self.state.lock().unwrap();
        let inside = state
            .namespaces
            .get_mut(netns)
            .ok_or_else(|| NetnsError::Missing { path: netns.into() })?;
        inside.insert(link.ifname.clone(), link.ip);
        Ok(())
    }

    async fn unwire_inside(&self, _netns: &str, _link: &ContainerLink) -> Result<()> {
        Ok(())
    }

    async fn check_inside(&self, netns: &str, link: &ContainerLink) -> Result<InsideCheck> {
        let (ifname, ip) = (&link.ifname, link.ip);
        let state = self.state.lock().unwrap();
        let inside = state
            .namespaces
            .get(netns)
            .ok_or_else(|| NetnsError::Missing { path: netns.into() })?;
        Ok(match inside.get(ifname) {
            None => InsideCheck {
                interface_present: false,
                problems: vec![format!("{ifname} is missing in {netns}")],
            },
            Some(held) if *held != ip => InsideCheck {
                interface_present: true,
                problems: vec![format!("{ifname} in {netns} does not hold {ip}")],
            },
            Some(_) => InsideCheck {
                interface_present: true,
                problems: vec![],
            },
        })
    }

    async fn check_host_side(&self, host_ifname: &str, ips: &[IpAddr]) -> Result<Vec<String>> {
        let state = self.state.lock().unwrap();
        let Some(link) = state.links.get(host_ifname) else {
            return Ok(vec![format!("host veth {host_ifname} is missing")]);
        };
        Ok(ips
            .iter()
            .map(|ip| Route::host(*ip, RouteTarget::Dev(link.index)))
            .filter(|wanted| !state.routes.contains(wanted))
            .map(|wanted| format!("no route to {} through {host_ifname}", wanted.dst))
            .collect())
    }
}
