//! The agent's domain values, validated once where they enter (a request, a flag) and typed
//! from there on: ids and names, published ports, an attach request, routes, and the fabric's
//! constants. Nothing here performs I/O.

mod attach;
mod fabric;
mod ids;
mod invalid;
mod ports;
mod route;

pub use attach::{AttachRequest, NetnsSpec};
pub use fabric::{
    veth_name, vtep_mac, Mac, GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC, LINK_PREFIX, RETIRED_GROUP,
    RT_PROTO_WEFT, TUNNEL_DEVICE, VXLAN_OVERHEAD, VXLAN_PORT, VXLAN_VNI,
};
pub use ids::{ContainerId, HostName, IfName, MAX_CONTAINER_ID};
pub use invalid::Invalid;
pub use ports::{port_mapping, validate_ports, PortMapping, Protocol, MAX_PORTS};
pub use route::{Route, RouteTarget};
