//! Defects 5 and 6: host ports held by a listener, and the datastore and metrics listener out of
//! containers' reach.

use super::support::*;

// ---- 5. host-port listeners ------------------------------------------------------------------------

#[tokio::test]
async fn publishing_a_port_a_host_socket_listens_on_is_refused_unless_overridden() {
    let mut lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let (_tcp, _udp) = in_netns(&h1, || {
        (
            TcpListener::bind(("0.0.0.0", 2222)).unwrap(),
            UdpSocket::bind(("0.0.0.0", 5300)).unwrap(),
        )
    });
    let mut client = lab.client(0).await.unwrap();
    let cases = [("tcp", 2222u32, "thief-tcp"), ("udp", 5300u32, "thief-udp")];
    for (protocol, port, id) in cases {
        let mut req = request(id);
        req.ports = vec![pb::PortMapping {
            protocol: protocol.into(),
            host_port: port,
            container_port: 80,
        }];
        let status = attach(&mut client, req)
            .await
            .expect_err("a port a host socket listens on must be refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&port.to_string()),
            "the message names the port: {status:?}"
        );
        let all = keys(&lab);
        assert!(!all.keys().any(|k| k.contains("/ports/")), "{all:?}");
        assert!(!all
            .keys()
            .any(|k| k.contains("/ips/") || k.contains("/endpoints/")));
        assert!(!nat_rules(&h1).contains(&format!("--dport {port}")));
        assert!(weft_links(&h1).is_empty(), "{:?}", weft_links(&h1));
        assert!(lab.container_namespaces().is_empty());
    }

    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    lab.start_agent_with(0, &["--allow-host-port-override"])
        .unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let mut client = lab.client(0).await.unwrap();
    for (protocol, port, id) in cases {
        let mut req = request(id);
        req.ports = vec![pb::PortMapping {
            protocol: protocol.into(),
            host_port: port,
            container_port: 80,
        }];
        attach(&mut client, req)
            .await
            .unwrap_or_else(|e| panic!("with the override, {protocol}/{port}: {e:?}"));
    }
}

// ---- 6. datastore protection -----------------------------------------------------------------------

#[test]
fn containers_cannot_reach_etcd_or_a_non_loopback_metrics_listener() {
    let mut lab = hlab(hosts(1, &["--metrics-addr", "0.0.0.0:9099"]));
    let h1 = host_ns(&lab, 0);
    let host_ip = lab.hosts[0].ip.to_string();
    let (ns, _) = lab.attach(0, "c1").unwrap();
    let echo = bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    lab.eventually(
        "the container reaches the outside host",
        Duration::from_secs(10),
        || tcp_connects(&ns, OUTSIDE_IP, 7000),
    )
    .unwrap();
    assert!(tcp_connects(&h1, ROUTER_IP, 2379), "the host reaches etcd");
    assert!(
        tcp_connects(&h1, &host_ip, 9099),
        "the host reaches its metrics"
    );

    lab.eventually(
        "the container is kept from etcd",
        Duration::from_secs(10),
        || !tcp_connects(&ns, ROUTER_IP, 2379),
    )
    .unwrap_or_else(|e| panic!("{e}: a container opened a connection to etcd"));
    assert!(
        !tcp_connects(&ns, &host_ip, 9099),
        "a container opened a connection to its host's metrics listener"
    );
    assert!(!tcp_connects(&ns, ROUTER_IP, 2379), "still kept from etcd");
    assert!(
        tcp_connects(&ns, OUTSIDE_IP, 7000),
        "the outside still works"
    );
    assert!(
        tcp_connects(&h1, ROUTER_IP, 2379),
        "the host still reaches etcd"
    );
    assert!(
        tcp_connects(&h1, &host_ip, 9099),
        "the host still reaches its metrics"
    );

    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    lab.start_agent_with(0, &["--protect-datastore=false"])
        .unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.eventually(
        "without protection the container reaches etcd",
        Duration::from_secs(10),
        || tcp_connects(&ns, ROUTER_IP, 2379),
    )
    .unwrap();
}
