#[allow(dead_code)]
pub mod answers;
#[allow(dead_code)]
pub mod client;
#[allow(dead_code)]
pub mod courier;
#[allow(dead_code)]
pub mod dovecot;
#[allow(dead_code)]
pub mod fake_upstream;
#[allow(dead_code)]
pub mod fetchmail;
#[allow(dead_code)]
pub mod gateway;
#[allow(dead_code)]
pub mod mailgen;
#[allow(dead_code)]
pub mod mbsync;
#[allow(dead_code)]
pub mod oauth;
#[allow(dead_code)]
pub mod peers;
#[allow(dead_code)]
pub mod pop3;
#[allow(dead_code)]
pub mod process;
#[allow(dead_code)]
pub mod redis;
#[allow(dead_code)]
pub mod redis_cluster;
#[allow(dead_code)]
pub mod setup;
#[allow(dead_code)]
pub mod tls;
#[allow(dead_code)]
pub mod wire;
