//! IPAM allocation speed in a /16 pool: one allocate+release cycle through the crash-safe
//! file store (lock, journal append, fdatasync), against the same cycle on the in-memory
//! state alone (the floor: pure assignment logic). Goal: >= 2,000 file-store cycles/s.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nodekit_cni::ipam::allocator;
use nodekit_cni::ipam::file_store::FileStore;
use nodekit_cni::ipam::model::{Handle, IpamState, Pool};
use nodekit_cni::ipam::store::{transact_with, Datastore};

fn handle(i: u64) -> Handle {
    Handle {
        id: format!("bench.{i}.eth0"),
        network: "bench".into(),
        container_id: i.to_string(),
        ifname: "eth0".into(),
        node: "n1".into(),
        netns: String::new(),
        addresses: vec![],
        pod: None,
    }
}

fn pool() -> Pool {
    Pool::new("default", "10.244.0.0/16".parse().unwrap(), None).unwrap()
}

/// A store with 200 addresses already held, so blocks exist and searches are realistic.
fn prepared_store(dir: &std::path::Path) -> FileStore {
    let store = FileStore::open(dir).unwrap();
    store
        .transact(&mut |s| allocator::ensure_pool(s, pool(), allocator::Overrides::ALL))
        .unwrap();
    for i in 0..200 {
        transact_with(&store, |s| {
            allocator::assign(s, handle(1_000_000 + i), &allocator::Choice::default())
        })
        .unwrap();
    }
    store
}

fn cycle(store: &FileStore, i: u64) {
    let h = handle(i);
    let id = h.id.clone();
    transact_with(store, |s| {
        allocator::assign(s, h.clone(), &allocator::Choice::default())
    })
    .unwrap();
    store
        .transact(&mut |s| {
            allocator::release(s, &id);
            Ok(())
        })
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = prepared_store(dir.path());
    let mut group = c.benchmark_group("ipam allocate+release /16");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("file store", |b| {
        b.iter(|| {
            i += 1;
            cycle(&store, i)
        })
    });
    let mut state = IpamState::default();
    allocator::ensure_pool(&mut state, pool(), allocator::Overrides::ALL).unwrap();
    group.bench_function("in-memory floor", |b| {
        b.iter(|| {
            i += 1;
            let h = handle(i);
            let id = h.id.clone();
            allocator::assign(&mut state, h, &allocator::Choice::default()).unwrap();
            allocator::release(&mut state, &id);
            state.take_changes() // what a commit reads
        })
    });
    group.finish();

    // A plain figure against the goal, measured in the same run.
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        n += 1;
        cycle(&store, 10_000_000 + n);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let floor = durable_write_floor(dir.path());
    println!(
        "file store: {rate:.0} allocate+release cycles/s ({:.2}x the goal of 2,000/s)\n\
         floor: two durable 600-byte overwrites (pwrite + fdatasync) take {:.0} us here, \
         so this disk allows at most {:.0} cycles/s; the store reaches {:.0}% of that",
        rate / 2000.0,
        floor * 2e6,
        1.0 / (2.0 * floor),
        rate * 2.0 * floor * 100.0
    );
}

/// Seconds per durable small overwrite of a preallocated file: what every commit must pay.
fn durable_write_floor(dir: &std::path::Path) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("floor");
    let file = std::fs::File::create(&path).unwrap();
    file.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
    file.sync_all().unwrap();
    let record = [b'x'; 600];
    let start = Instant::now();
    let n = 1000u64;
    for i in 0..n {
        file.write_all_at(&record, i * 600).unwrap();
        file.sync_data().unwrap();
    }
    start.elapsed().as_secs_f64() / n as f64
}

criterion_group!(benches, bench);
criterion_main!(benches);
