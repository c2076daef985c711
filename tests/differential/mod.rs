//! The differential tester's parts (see `tests/differential.rs` for what it does and how to
//! run it).

pub mod action;
pub mod answer;
pub mod env;
pub mod exec;
pub mod generate;
pub mod mailgate;
pub mod minimize;
pub mod model;
pub mod pop3;
pub mod run;
pub mod server;
pub mod wire;
