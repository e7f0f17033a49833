//! The draw is a function of the seed; answers are judged by the contract.

use super::*;
use crate::invariants::Port;

#[test]
fn the_same_seed_draws_the_same_operations() {
    let draw = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (1..=20)
            .map(|i| {
                let b = gen_burst(&mut rng, 3, i);
                format!(
                    "{:?} {:?}",
                    b.window,
                    b.ops.iter().map(Op::to_string).collect::<Vec<_>>()
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn expected_answers_follow_the_contract() {
    let mut m = Model::new(1);
    let web = vec![Port {
        protocol: "tcp".into(),
        host_port: 8000,
        container_port: 80,
    }];
    let a = Key::Agent("a".into());
    let b = Key::Agent("b".into());
    assert_eq!(m.expect_attach(0, &a, &web, true), vec![Kind::Ok]);
    m.apply_attach(0, a.clone(), &web, Kind::Ok, true, "test");
    // Another container wants the same host port: refused.
    assert_eq!(
        m.expect_attach(0, &b, &web, true),
        vec![Kind::AlreadyExists]
    );
    // Re-attach of the holder with the same port is fine, also without etcd.
    assert_eq!(m.expect_attach(0, &a, &web, true), vec![Kind::Ok]);
    assert!(m.expect_attach(0, &a, &web, false).contains(&Kind::Ok));
    // A new container without etcd: unavailable; a known one may not be detached then.
    assert_eq!(m.expect_attach(0, &b, &[], false), vec![Kind::Unavailable]);
    assert_eq!(m.expect_detach(0, &a, false), vec![Kind::Unavailable]);
    m.apply_detach(0, a.clone(), Kind::Ok, true, "test");
    assert!(m.hosts[0].is_empty());
}

#[test]
fn the_seed_chooses_the_stack_and_ipv6_turns_flip_ipv6_knobs() {
    assert_eq!(Stack::of_seed(7), Stack::DualStack);
    assert_eq!(Stack::of_seed(8), Stack::Ipv4);
    assert_eq!(ChaosOptions::new(9, Duration::ZERO).stack, Stack::DualStack);
    assert_eq!("dual-stack".parse::<Stack>().unwrap(), Stack::DualStack);
    assert_eq!(
        Stack::Ipv4.to_string().parse::<Stack>().unwrap(),
        Stack::Ipv4
    );
    assert!("ipv6".parse::<Stack>().is_err());
    for flip in SYSCTL_FLIPS {
        let (path, value) = ipv6_twin(*flip);
        assert!(
            path.contains("/ipv6/") || *flip == (path, value),
            "{flip:?} -> {path}"
        );
    }
    assert_eq!(
        ipv6_twin(SYSCTL_FLIPS[1]),
        ("/proc/sys/net/ipv6/conf/{}/proxy_ndp", "0")
    );
}
