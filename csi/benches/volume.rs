//! Volume benchmark (not a timed test; needs root, e2fsprogs, xfsprogs):
//!
//! 1. per 1 GiB ext4 volume, CreateVolume + NodeStageVolume + NodePublishVolume and the
//!    reverse through the real driver, against the bare sequence (sparse file, loop attach,
//!    mkfs, mount / umount, detach, remove) timed in the same run (goal: at most 1.2x),
//!    with the cost of a no-op RPC (NodeGetCapabilities) on the same connection: the floor
//!    that the driver's three RPCs per half add to the bare sequence;
//! 2. CreateSnapshot of a 1 GiB volume holding 256 MiB of data on an xfs pool (reflink;
//!    goal: under 50 ms);
//! 3. 20 volumes created and staged in parallel (goal: no loop-device contention failure).
//!
//! `cargo bench -p nodekit-csi --bench volume [-- ROUNDS]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use nodekit_csi::fstools::{FsTools, FsType, SystemFsTools};
use nodekit_csi::image;
use nodekit_csi::loopdev::{KernelLoopDevices, LoopDevices};
use nodekit_csi::mounter::{KernelMounter, MountOptions, Mounter};
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::*;

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The bare kernel sequence for one volume: (setup, teardown).
fn bare_round(lab: &Lab, i: usize) -> (Duration, Duration) {
    let loops = KernelLoopDevices::default();
    let mounter = KernelMounter::default();
    let img = std::fs::canonicalize(lab.pool())
        .expect("pool")
        .join(format!("bare-{i}.img"));
    let mnt = lab.path().join(format!("bare-mnt-{i}"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let start = Instant::now();
    image::create_sparse(&img, GIB).expect("sparse");
    let dev = loops.attach(&img).expect("attach");
    SystemFsTools.mkfs(FsType::Ext4, &dev.path()).expect("mkfs");
    let opts = MountOptions::parse::<&str>(&[]).expect("opts");
    mounter
        .mount_fs(&dev.path(), &mnt, "ext4", &opts)
        .expect("mount");
    let setup = start.elapsed();
    let start = Instant::now();
    mounter.unmount(&mnt).expect("umount");
    loops.detach(dev).expect("detach");
    image::remove(&img).expect("rm");
    (setup, start.elapsed())
}

/// The same through the driver: (create+stage+publish, unpublish+unstage+delete).
async fn driver_round(c: &mut Clients, lab: &Lab, i: usize) -> (Duration, Duration) {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let name = format!("bench-{i}");
    let staging = lab.staging(&name);
    let target = lab.target(&name);
    let start = Instant::now();
    let vol = c.create(&name, GIB, cap.clone()).await;
    c.stage(&vol, &staging, cap.clone()).await;
    c.publish(&vol, &staging, &target, cap, false).await;
    let setup = start.elapsed();
    let start = Instant::now();
    c.unpublish(&vol.volume_id, &target).await;
    c.unstage(&vol.volume_id, &staging).await;
    c.delete(&vol.volume_id).await;
    (setup, start.elapsed())
}

async fn snapshot_rounds(c: &mut Clients, lab: &Lab, rounds: usize) -> Vec<Duration> {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = c.create("snap-src", GIB, cap.clone()).await;
    let staging = lab.staging("snap-src");
    c.stage(&vol, &staging, cap).await;
    {
        let mut f = std::fs::File::create(staging.join("data")).expect("create");
        let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 249) as u8).collect();
        for _ in 0..256 {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("sync");
    }
    let mut times = Vec::new();
    for i in 0..rounds {
        let start = Instant::now();
        let snap = c
            .controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: vol.volume_id.clone(),
                name: format!("snap-{i}"),
                ..Default::default()
            })
            .await
            .expect("snapshot")
            .into_inner()
            .snapshot
            .expect("snap");
        times.push(start.elapsed());
        c.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
            .expect("delete snapshot");
    }
    c.unstage(&vol.volume_id, &staging).await;
    c.delete(&vol.volume_id).await;
    times
}

async fn parallel_creates(c: &Clients, lab: &Lab, n: usize) -> (Duration, usize) {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let start = Instant::now();
    let mut done = Vec::new();
    let mut failures = 0;
    for r in create_and_stage_in_parallel(c, lab, n, 64 << 20, &cap).await {
        match r {
            Ok(v) => done.push(v),
            Err(e) => {
                eprintln!("parallel create failed: {e}");
                failures += 1;
            }
        }
    }
    let took = start.elapsed();
    let mut c = c.clone();
    for (id, staging) in done {
        c.unstage(&id, &staging).await;
        c.delete(&id).await;
    }
    (took, failures)
}

/// One no-op RPC round trip.
async fn noop_rpc(c: &mut Clients) -> Duration {
    let start = Instant::now();
    c.node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities");
    start.elapsed()
}

/// Interleaves `rounds` bare and driver rounds and prints the medians and ratios.
fn compare(rt: &tokio::runtime::Runtime, c: &mut Clients, lab: &Lab, rounds: usize, what: &str) {
    let (mut bare_up, mut bare_down, mut drv_up, mut drv_down) = (vec![], vec![], vec![], vec![]);
    let mut noops = vec![];
    for i in 0..rounds {
        noops.push(rt.block_on(noop_rpc(c)));
        let (u, d) = bare_round(lab, i);
        bare_up.push(u);
        bare_down.push(d);
        let (u, d) = rt.block_on(driver_round(c, lab, i));
        drv_up.push(u);
        drv_down.push(d);
    }
    let (bu, bd, du, dd) = (
        median(bare_up),
        median(bare_down),
        median(drv_up),
        median(drv_down),
    );
    println!("1 GiB ext4 volume, driver {what}, median of {rounds} interleaved rounds:");
    println!(
        "  create+stage+publish    bare {:6.1} ms   driver {:6.1} ms   ratio {:.2}x",
        ms(bu),
        ms(du),
        du.as_secs_f64() / bu.as_secs_f64()
    );
    println!(
        "  unpublish+unstage+delete bare {:5.1} ms   driver {:6.1} ms   ratio {:.2}x",
        ms(bd),
        ms(dd),
        dd.as_secs_f64() / bd.as_secs_f64()
    );
    let total = (du + dd).as_secs_f64() / (bu + bd).as_secs_f64();
    println!("  round trip ratio {total:.2}x (goal <= 1.2x)");
    let noop = median(noops);
    println!(
        "  no-op RPC {:.2} ms: three per half put the floor at {:.2}x setup, {:.2}x teardown",
        ms(noop),
        (bu + noop * 3).as_secs_f64() / bu.as_secs_f64(),
        (bd + noop * 3).as_secs_f64() / bd.as_secs_f64()
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let lab = Lab::new(Pool::Xfs(6 * 1024));
    let driver = lab.start(&[]);
    let mut c = rt.block_on(driver.clients());

    compare(&rt, &mut c, &lab, rounds, "state on disk (durable)");

    let snaps = rt.block_on(snapshot_rounds(&mut c, &lab, rounds.min(10)));
    let reflink = driver.log_text().contains("Reflink");
    println!(
        "CreateSnapshot of a 1 GiB volume with 256 MiB of data on xfs: median {:.1} ms, max {:.1} ms ({}; goal < 50 ms)",
        ms(median(snaps.clone())),
        ms(snaps.iter().max().copied().unwrap_or_default()),
        if reflink { "reflink" } else { "copy" }
    );

    let (took, failures) = rt.block_on(parallel_creates(&c, &lab, 20));
    println!(
        "20 volumes created + staged in parallel: {:.0} ms, {failures} failures (goal: 0)",
        ms(took)
    );
    drop(c);
    assert!(driver.stop(), "clean stop");

    // The same rounds with the state files on tmpfs: the driver's own work without the
    // cost of its durable state writes (each an fsync of the file and its directory).
    let shm = tempfile::Builder::new()
        .prefix("nk-csi-bench-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let driver = lab.start_with_state(shm.path(), &[]);
    let mut c = rt.block_on(driver.clients());
    compare(&rt, &mut c, &lab, rounds, "state on tmpfs (no fsync cost)");
    drop(c);
    drop(driver);
    lab.assert_clean();
}
