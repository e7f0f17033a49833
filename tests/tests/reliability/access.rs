//! Malformed records in etcd, and access control: a root-only API socket, etcd over TLS without
//! leaking secrets.

use super::support::*;

#[test]
fn malformed_records_in_etcd_are_skipped_not_fatal() {
    let mut lab = lab(LabOptions::default());
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    let h1 = lab.hosts[0].name.clone();
    for (key, value) in [
        (
            "/weft/v1/hosts/garbage".to_string(),
            "{not json".to_string(),
        ),
        (
            "/weft/v1/blocks/default/10.65.255.0-26".to_string(),
            "[]".to_string(),
        ),
        (
            "/weft/v1/blocks/default/not-a-block".to_string(),
            "{\"host\":\"x\"}".to_string(),
        ),
        (
            format!("/weft/v1/endpoints/{h1}/junk"),
            "\u{1}\u{2}".to_string(),
        ),
        ("/weft/v1/ips/10.65.0.999".to_string(), "{}".to_string()),
    ] {
        lab.etcd().put(&key, &value).unwrap();
    }
    // The agents keep serving and routing, and a restart reads past the junk.
    std::thread::sleep(Duration::from_secs(1));
    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.attach(0, "after-junk").unwrap();
    assert!(sh::ping(&ns1, &ip2));
    for i in 0..3 {
        assert!(lab.ctl(i, &["status"]).unwrap().status.success());
    }
    let log = lab.agent_log(0);
    assert!(
        log.contains("skipping malformed record"),
        "reported in the log"
    );
}

#[test]
fn the_api_socket_is_root_only_and_etcd_tls_works_without_leaking_secrets() {
    let lab = lab(LabOptions {
        hosts: 2,
        etcd_tls: true,
        ..Default::default()
    });
    let socket = &lab.hosts[0].socket;
    let mode = std::fs::metadata(socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o002,
        0,
        "socket directory must not be world-writable"
    );

    // The agents reached etcd over TLS with client certificates.
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    lab.eventually("fabric over TLS etcd", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip2)
    })
    .unwrap();
    // Without a client certificate etcd refuses.
    let tls = lab.etcd_tls.clone().unwrap();
    let url = lab.etcd_endpoints();
    let denied = sh::in_ns(
        &lab.router,
        &[
            "etcdctl",
            "--endpoints",
            &url,
            "--cacert",
            tls.ca.to_str().unwrap(),
            "get",
            "/weft",
        ],
    )
    .unwrap();
    assert!(
        !denied.status.success(),
        "etcd must demand a client certificate"
    );

    // No secret in the logs.
    let key = std::fs::read_to_string(&tls.client_key).unwrap();
    let key_body: String = key.lines().nth(1).unwrap().to_string();
    for i in 0..2 {
        let log = lab.agent_log(i);
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains(&key_body),
            "log {i} leaks the key"
        );
    }
}
