//! Integration tests: the real server on a loopback port, driven through the generated
//! tonic client (and grpcurl, for the README walk-through).

mod harness;

mod admission;
mod api;
mod audit_trail;
mod claims;
mod cli;
mod crash;
mod durability;
mod examples;
mod hardening;
mod invariants;
mod key_life;
mod kms;
mod leases;
mod ops;
mod pg_tls;
mod quotas;
mod reflection;
mod refusals;
mod replica_kill;
mod replicas;
mod rotation;
mod streams;
mod tamper;
mod trail_damage;
mod usage;
mod walkthrough;
mod work;
