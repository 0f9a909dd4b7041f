//! Picking free loopback ports for a cluster.
//!
//! `meridian cluster init --base-port P` gives node `i` the HTTP port `P + i` and the
//! peer (QUIC/UDP) port `P + 100 + i`. [`pick_base_port`] finds a `P` for which all of
//! those are free right now (checked by binding them) and not handed out before in
//! this process. Another process can still take a port between the check and the
//! node's bind; the cluster harness retries with a new base port when that happens.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::{Mutex, PoisonError};

use anyhow::{Result, bail};
use rand::Rng as _;

/// Distance between a node's HTTP port and its peer port.
pub const PEER_PORT_OFFSET: u16 = 100;

/// Most nodes one base port can serve (HTTP ports must stay below the peer ports).
pub const MAX_NODES: usize = PEER_PORT_OFFSET as usize;

/// Base ports are drawn from here: below Linux's ephemeral range (32768–60999), so
/// ports the kernel hands to `bind(0)` (relays, HTTP clients) never collide with them.
const BASE_PORT_RANGE: std::ops::RangeInclusive<u16> = 10_000..=32_000;

/// Ports handed out by this process, never handed out twice.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Whether a TCP listener can bind `127.0.0.1:port` now.
pub fn tcp_port_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Whether a UDP socket can bind `127.0.0.1:port` now.
pub fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The ports a cluster of `nodes` nodes uses with base port `base`: HTTP ports first.
pub fn cluster_ports(base: u16, nodes: usize) -> Vec<u16> {
    let nodes = nodes as u16;
    (0..nodes)
        .map(|i| base + i)
        .chain((0..nodes).map(|i| base + PEER_PORT_OFFSET + i))
        .collect()
}

/// Picks a base port for `nodes` nodes whose HTTP ports are free for TCP and whose peer
/// ports are free for UDP (and TCP), and reserves them for this process.
pub fn pick_base_port(nodes: usize) -> Result<u16> {
    if nodes == 0 || nodes > MAX_NODES {
        bail!("a cluster needs between 1 and {MAX_NODES} nodes, not {nodes}");
    }
    let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let base = rng.random_range(BASE_PORT_RANGE);
        let ports = cluster_ports(base, nodes);
        if ports.iter().any(|p| reserved.contains(p)) {
            continue;
        }
        let (http, peer) = ports.split_at(nodes);
        let free = http.iter().all(|&p| tcp_port_free(p))
            && peer.iter().all(|&p| udp_port_free(p) && tcp_port_free(p));
        if free {
            reserved.extend(ports);
            return Ok(base);
        }
    }
    bail!("found no free base port for {nodes} nodes after 200 tries")
}

/// Picks one HTTP port free for TCP and one peer port free for UDP and TCP (for a node added
/// to a running cluster), and reserves both for this process.
pub fn pick_node_ports() -> Result<(u16, u16)> {
    let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let http = rng.random_range(BASE_PORT_RANGE);
        let peer = rng.random_range(BASE_PORT_RANGE);
        if http == peer || reserved.contains(&http) || reserved.contains(&peer) {
            continue;
        }
        if tcp_port_free(http) && udp_port_free(peer) && tcp_port_free(peer) {
            reserved.extend([http, peer]);
            return Ok((http, peer));
        }
    }
    bail!("found no free ports for a node after 200 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_free_and_distinct() {
        let a = pick_base_port(6).unwrap();
        let b = pick_base_port(6).unwrap();
        let pa = cluster_ports(a, 6);
        let pb = cluster_ports(b, 6);
        assert_eq!(pa.len(), 12);
        assert!(pa.iter().all(|p| !pb.contains(p)), "{pa:?} / {pb:?}");
        for &p in &pa[..6] {
            assert!(tcp_port_free(p));
        }
        for &p in &pa[6..] {
            assert!(udp_port_free(p));
        }
        assert_eq!(pa[6], a + PEER_PORT_OFFSET);
    }

    #[test]
    fn busy_ports_are_detected() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!tcp_port_free(tcp.local_addr().unwrap().port()));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!udp_port_free(udp.local_addr().unwrap().port()));
    }

    #[test]
    fn node_counts_are_bounded() {
        assert!(pick_base_port(0).is_err());
        assert!(pick_base_port(MAX_NODES + 1).is_err());
    }
}
