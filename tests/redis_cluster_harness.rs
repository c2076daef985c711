//! The Redis Cluster test support (`support::redis_cluster`) behaves as the tests built on it
//! assume: keys placed on the node that serves them, other nodes redirecting with `-MOVED`,
//! and a killed master taking only its own keys away.

mod support;

use std::time::Instant;

use support::redis_cluster::{key_slot, RedisCluster};

#[test]
fn key_slots_are_crc16_of_the_key_or_its_hash_tag() {
    // 0x31C3: the CRC16 check value of "123456789" in the Redis Cluster specification.
    assert_eq!(key_slot("123456789"), 0x31C3);
    assert_eq!(key_slot("somekey"), 11058);
    assert_eq!(key_slot("foo{hash_tag}"), key_slot("hash_tag"));
    assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
    // Only the first `{` and the `}` after it count; an empty tag hashes the whole key.
    assert_eq!(key_slot("foo{bar}{zap}"), key_slot("bar"));
    assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
    assert_eq!(key_slot(""), 0);
}

#[test]
fn a_cluster_serves_each_key_on_its_node_and_survives_a_killed_master() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start();
    eprintln!("the cluster started in {:?}", started.elapsed());
    assert_eq!(cluster.urls().len(), 3);
    assert!(cluster.urls().iter().all(|url| url.starts_with("redis://127.0.0.1:") && url.ends_with('/')));

    for key in ["123456789", "mailgate:conn:user:bob", "foo{bar}{zap}", "foo{}{bar}", "{a}b", "é{ü}"] {
        assert_eq!(cluster.integer(1, &["CLUSTER", "KEYSLOT", key]), i64::from(key_slot(key)), "{key}");
    }

    // One key per node, each written and read on its own node.
    let keys: Vec<String> =
        (0..3).map(|n| (0..).map(|i| format!("key:{i}")).find(|key| cluster.node_of_key(key) == n).unwrap()).collect();
    for (n, key) in keys.iter().enumerate() {
        assert_eq!(cluster.command(n, &["SET", key, &format!("value {n}")]), "+OK");
        assert_eq!(cluster.command(n, &["GET", key]), format!("value {n}"));
        let elsewhere = (n + 1) % 3;
        let moved = format!("-MOVED {} {}", key_slot(key), cluster.addr(n));
        assert_eq!(cluster.command(elsewhere, &["GET", key]), moved, "{key} asked on node {elsewhere}");
    }
    assert_eq!(cluster.dbsize_total(), 3);

    cluster.kill(2);
    assert!(cluster.try_command(2, &["PING"]).is_err(), "a killed node refuses connections");
    cluster.await_failed(2);
    for n in 0..2 {
        let info = cluster.command(n, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "cluster-require-full-coverage no keeps node {n} up:\n{info}");
        assert_eq!(cluster.command(n, &["GET", &keys[n]]), format!("value {n}"));
        assert_eq!(cluster.command(n, &["SET", &format!("{{{}}}:more", keys[n]), "x"]), "+OK");
        // The dead node's key: still its slot, so redirected to where nothing answers.
        let moved = format!("-MOVED {} {}", key_slot(&keys[2]), cluster.addr(2));
        assert_eq!(cluster.command(n, &["GET", &keys[2]]), moved);
    }
    assert_eq!(cluster.dbsize_total(), 4, "two keys of the first run and two new, the dead node's not counted");
}
