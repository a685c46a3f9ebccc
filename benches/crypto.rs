//! Micro-benchmarks of the envelope: AES-256-GCM seal/open of a 100-byte value, and wrap/unwrap
//! of its data key by a local master key. `cargo bench --bench crypto`. A SHA-256 of the same
//! 100 bytes runs in the same process as the baseline to compare against.

use std::hint::black_box;

use byokd::crypto::{self, SymmetricKey};
use byokd::keyring::{LocalMasterKey, MasterKey, WrapContext};
use byokd::model::{SecretId, TenantId};
use criterion::{Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

fn envelope(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let value = [b'k'; 100];
    let data_key = SymmetricKey::generate().expect("key");
    let aad = crypto::associated_data(
        "byokd/v1/secret-value",
        &[b"acme", &[7; 16], &1u32.to_be_bytes()],
    );
    let sealed = crypto::seal(&data_key, &value, &aad).expect("seal");
    let master = LocalMasterKey::from_key(&SymmetricKey::generate().expect("key")).expect("master");
    let context = WrapContext::SecretVersion {
        tenant: TenantId::parse("acme").expect("tenant"),
        secret_id: SecretId::generate(),
        version: 1,
    };
    let wrapped = runtime
        .block_on(master.wrap(&data_key, &context))
        .expect("wrap");

    c.bench_function("baseline: sha256 of 100 B", |b| {
        b.iter(|| Sha256::digest(black_box(&value)))
    });
    c.bench_function("seal 100 B (AES-256-GCM, random nonce)", |b| {
        b.iter(|| crypto::seal(&data_key, black_box(&value), &aad))
    });
    c.bench_function("open 100 B", |b| {
        b.iter(|| crypto::open(&data_key, black_box(&sealed), &aad))
    });
    c.bench_function("wrap data key (local master key)", |b| {
        b.iter(|| runtime.block_on(master.wrap(black_box(&data_key), &context)))
    });
    c.bench_function("unwrap data key (local master key)", |b| {
        b.iter(|| runtime.block_on(master.unwrap(black_box(&wrapped), &context)))
    });
}

criterion_group!(benches, envelope);
criterion_main!(benches);
