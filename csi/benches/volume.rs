//! Volume benchmark (not a timed test; needs root, e2fsprogs, xfsprogs):
//!
//! 1. per 1 GiB ext4 volume, CreateVolume + NodeStageVolume + NodePublishVolume and the
//!    reverse through the real driver, against the bare sequence (sparse file, loop attach,
//!    mkfs, mount / umount, detach, remove) timed in the same run (goal: at most 1.2x),
//!    per step too, and the floor under the driver: the bare sequence plus what publishing
//!    adds (a bind mount at a target, then its unmount) plus six no-op RPCs
//!    (NodeGetCapabilities) on the same connection;
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

/// Step names and times of one half of a round.
type Steps = Vec<(&'static str, Duration)>;

/// Times each step of a sequence, in order.
struct Stopwatch {
    last: Instant,
    steps: Steps,
}

impl Stopwatch {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

/// The bare kernel sequence for one volume: (setup, teardown) steps, and apart from them
/// what a publish adds to it (a target directory bind-mounted, then unmounted and removed).
fn bare_round(lab: &Lab, i: usize) -> (Steps, Steps, Steps) {
    let loops = KernelLoopDevices::default();
    let mounter = KernelMounter::default();
    let img = std::fs::canonicalize(lab.pool())
        .expect("pool")
        .join(format!("bare-{i}.img"));
    let mnt = lab.path().join(format!("bare-mnt-{i}"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let opts = MountOptions::parse::<&str>(&[]).expect("opts");
    let mut up = Stopwatch::start();
    image::create_sparse(&img, GIB).expect("sparse");
    up.lap("sparse file");
    let dev = loops.attach(&img).expect("attach");
    up.lap("loop attach");
    SystemFsTools.mkfs(FsType::Ext4, &dev.path()).expect("mkfs");
    up.lap("mkfs");
    mounter
        .mount_fs(&dev.path(), &mnt, "ext4", &opts)
        .expect("mount");
    up.lap("mount");
    let target = lab.path().join(format!("bare-target-{i}"));
    let mut publish = Stopwatch::start();
    std::fs::create_dir(&target).expect("mkdir target");
    mounter
        .bind(&mnt, &target, nix::mount::MsFlags::empty())
        .expect("bind");
    publish.lap("bind");
    mounter.unmount(&target).expect("unbind");
    std::fs::remove_dir(&target).expect("rmdir target");
    publish.lap("unbind");
    let mut down = Stopwatch::start();
    mounter.unmount(&mnt).expect("umount");
    down.lap("umount");
    loops.detach(dev).expect("detach");
    down.lap("loop detach");
    image::remove(&img).expect("rm");
    down.lap("rm");
    (up.steps, down.steps, publish.steps)
}

/// The same through the driver: (create, stage, publish) and (unpublish, unstage, delete).
async fn driver_round(c: &mut Clients, lab: &Lab, i: usize) -> (Steps, Steps) {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let name = format!("bench-{i}");
    let staging = lab.staging(&name);
    let target = lab.target(&name);
    let mut up = Stopwatch::start();
    let vol = c.create(&name, GIB, cap.clone()).await;
    up.lap("CreateVolume");
    c.stage(&vol, &staging, cap.clone()).await;
    up.lap("NodeStageVolume");
    c.publish(&vol, &staging, &target, cap, false).await;
    up.lap("NodePublishVolume");
    let mut down = Stopwatch::start();
    c.unpublish(&vol.volume_id, &target).await;
    down.lap("NodeUnpublishVolume");
    c.unstage(&vol.volume_id, &staging).await;
    down.lap("NodeUnstageVolume");
    c.delete(&vol.volume_id).await;
    down.lap("DeleteVolume");
    (up.steps, down.steps)
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

/// Per-step medians of `rounds` (each a list of named steps) and the median of their totals.
fn medians(rounds: &[Steps]) -> (Steps, Duration) {
    let steps = (0..rounds[0].len())
        .map(|k| {
            (
                rounds[0][k].0,
                median(rounds.iter().map(|r| r[k].1).collect()),
            )
        })
        .collect();
    let total = median(rounds.iter().map(|r| r.iter().map(|s| s.1).sum()).collect());
    (steps, total)
}

fn print_steps(who: &str, steps: &Steps) {
    let list: Vec<String> = steps
        .iter()
        .map(|(name, d)| format!("{name} {:.2}", ms(*d)))
        .collect();
    println!("    {who:6} {}", list.join(", "));
}

/// Interleaves `rounds` bare and driver rounds and prints the medians, per step too, and
/// the ratios, with the floor that the driver's six RPCs alone put under them.
fn compare(rt: &tokio::runtime::Runtime, c: &mut Clients, lab: &Lab, rounds: usize, what: &str) {
    let (mut bare_up, mut bare_down, mut drv_up, mut drv_down) = (vec![], vec![], vec![], vec![]);
    let (mut noops, mut publishes) = (vec![], vec![]);
    for i in 0..rounds {
        noops.push(rt.block_on(noop_rpc(c)));
        let (u, d, p) = bare_round(lab, i);
        bare_up.push(u);
        bare_down.push(d);
        publishes.push(p);
        let (u, d) = rt.block_on(driver_round(c, lab, i));
        drv_up.push(u);
        drv_down.push(d);
    }
    println!("1 GiB ext4 volume, driver {what}, median of {rounds} interleaved rounds (ms):");
    let mut totals = [Duration::ZERO; 2];
    for (half, bare, driver) in [
        ("create+stage+publish", &bare_up, &drv_up),
        ("unpublish+unstage+delete", &bare_down, &drv_down),
    ] {
        let (bare_steps, bare_total) = medians(bare);
        let (driver_steps, driver_total) = medians(driver);
        println!(
            "  {half:25} bare {:6.2}   driver {:6.2}   ratio {:.2}x",
            ms(bare_total),
            ms(driver_total),
            driver_total.as_secs_f64() / bare_total.as_secs_f64()
        );
        print_steps("bare", &bare_steps);
        print_steps("driver", &driver_steps);
        totals[0] += bare_total;
        totals[1] += driver_total;
    }
    let [bare, driver] = totals;
    let noop = median(noops);
    println!(
        "  round trip ratio {:.2}x (goal <= 1.2x); driver overhead {:.2} ms",
        driver.as_secs_f64() / bare.as_secs_f64(),
        ms(driver.saturating_sub(bare))
    );
    let (publish_steps, publish) = medians(&publishes);
    print_steps("bare target", &publish_steps);
    println!(
        "  floor: bare + the target's bind and unbind ({:.2}) + six no-op RPCs ({:.3} each) = {:.2}x",
        ms(publish),
        ms(noop),
        (bare + publish + noop * 6).as_secs_f64() / bare.as_secs_f64()
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    // A single-threaded client, as a kubelet's gRPC client costs about: a multi-threaded
    // one doubles a no-op RPC here (its reactor wakes the blocked thread), which is the
    // client's cost, not the driver's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
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
    // The connection's task runs only inside block_on: let it see the client go.
    rt.block_on(async {
        drop(c);
        tokio::task::yield_now().await;
    });
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
    rt.block_on(async {
        drop(c);
        tokio::task::yield_now().await;
    });
    drop(driver);
    lab.assert_clean();
}
