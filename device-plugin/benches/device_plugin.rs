//! The real plugin binary on the device lab, driven over unix sockets by the kubelet-side
//! library. Two figures: Allocate latency against the same connection's empty RPC
//! (GetDevicePluginOptions, the floor of a gRPC round trip here), goal < 1 ms median; and the
//! time from a device node's removal to the kubelet side seeing it Unhealthy, goal < 100 ms.
//! Needs root (mknod). Prints a summary with medians and p95 first, then criterion's runs.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nodekit_device_plugin::kubelet::registration::KubeletServer;
use nodekit_device_plugin::kubelet::DeviceManager;
use nodekit_device_plugin::lab::{self, Lab, PluginProcess, RESOURCE};
use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

struct Bench {
    rt: Runtime,
    _plugin: PluginProcess,
    _kubelet: KubeletServer,
    manager: DeviceManager,
    client: DevicePluginClient<Channel>,
    lab: Lab,
}

fn setup() -> Bench {
    let lab = Lab::create().expect("device lab (needs root for mknod)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let kubelet = {
        let _entered = rt.enter();
        manager.serve().unwrap()
    };
    let plugin = PluginProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_nodekit-device-plugin")),
        &lab.plugin_args(),
        &lab.log_path(),
    )
    .unwrap();
    rt.block_on(manager.wait_for(Duration::from_secs(10), |s| {
        s.resources
            .get(RESOURCE)
            .is_some_and(|r| r.connected && r.lists > 0)
    }))
    .expect("the plugin registered");
    let client = manager.client(RESOURCE).unwrap();
    Bench {
        rt,
        _plugin: plugin,
        _kubelet: kubelet,
        manager,
        client,
        lab,
    }
}

fn allocate_request() -> api::AllocateRequest {
    api::AllocateRequest {
        container_requests: vec![api::ContainerAllocateRequest {
            devices_ids: vec!["lab0::0".into(), "lab0::1".into()],
        }],
    }
}

fn options(b: &mut Bench) {
    let mut client = b.client.clone();
    b.rt.block_on(client.get_device_plugin_options(api::Empty {}))
        .unwrap();
}

fn allocate(b: &mut Bench) {
    let mut client = b.client.clone();
    b.rt.block_on(client.allocate(allocate_request())).unwrap();
}

/// Removes lab1, times until the kubelet side sees it Unhealthy, puts it back (untimed).
fn health_latency(b: &Bench) -> Duration {
    let unhealthy = |healthy: bool| {
        move |s: &nodekit_device_plugin::kubelet::Snapshot| {
            s.resources[RESOURCE]
                .device("lab1::0")
                .is_some_and(|d| d.healthy == healthy)
        }
    };
    let node = b.lab.node("lab1");
    let started = Instant::now();
    std::fs::remove_file(&node).unwrap();
    b.rt.block_on(b.manager.wait_for(Duration::from_secs(5), unhealthy(false)))
        .expect("Unhealthy seen");
    let took = started.elapsed();
    lab::make_node(&node).unwrap();
    b.rt.block_on(b.manager.wait_for(Duration::from_secs(5), unhealthy(true)))
        .expect("Healthy again");
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn timed(n: usize, mut f: impl FnMut() -> Duration) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..n).map(|_| f()).collect();
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.95))
}

fn summary(b: &mut Bench) {
    for _ in 0..200 {
        options(b);
        allocate(b);
    }
    let (empty_med, empty_p95) = timed(2000, || {
        let t = Instant::now();
        options(b);
        t.elapsed()
    });
    let (alloc_med, alloc_p95) = timed(2000, || {
        let t = Instant::now();
        allocate(b);
        t.elapsed()
    });
    let (health_med, health_p95) = timed(50, || health_latency(b));
    println!("device-plugin benchmark (release build, unix sockets, real plugin process):");
    println!(
        "  empty RPC (GetDevicePluginOptions): median {:>8.1} us  p95 {:>8.1} us",
        us(empty_med),
        us(empty_p95)
    );
    println!(
        "  Allocate (2 replicas):              median {:>8.1} us  p95 {:>8.1} us  ({:.2}x the empty RPC; goal < 1000 us)",
        us(alloc_med),
        us(alloc_p95),
        alloc_med.as_secs_f64() / empty_med.as_secs_f64()
    );
    println!(
        "  node removed -> kubelet Unhealthy:  median {:>8.2} ms  p95 {:>8.2} ms  (goal < 100 ms)",
        health_med.as_secs_f64() * 1e3,
        health_p95.as_secs_f64() * 1e3
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bench(c: &mut Criterion) {
    let mut b = setup();
    summary(&mut b);
    let mut group = c.benchmark_group("unix-socket RPC");
    group.bench_function("GetDevicePluginOptions (empty RPC)", |i| {
        i.iter(|| options(&mut b))
    });
    group.bench_function("Allocate 2 replicas", |i| i.iter(|| allocate(&mut b)));
    group.finish();
    let mut group = c.benchmark_group("health");
    group.sample_size(20);
    group.bench_function("device node removed -> kubelet sees Unhealthy", |i| {
        i.iter_custom(|iters| (0..iters).map(|_| health_latency(&b)).sum())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
