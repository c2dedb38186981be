//! The real binary over gRPC through whole volume lifecycles: real loop devices, mkfs,
//! mounts, data written and read back, size limits, block mode, snapshots (reflink on an
//! xfs pool, copy on an ext4 pool), restores, clones and expansion. Needs root, xfsprogs
//! and e2fsprogs.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use common::*;
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use nodekit_proto::csi::v1::*;
use tonic::Code;

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create in volume");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

/// Whether this process (and so the driver it starts) has CAP_SYS_RESOURCE (bit 24).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff");
    eff & (1 << 24) != 0
}

/// Writes 1 MiB chunks into `path` until the filesystem is full; returns the error.
fn fill(path: &Path) -> std::io::Error {
    let mut f = std::fs::File::create(path).expect("create");
    let chunk = vec![0xabu8; MIB as usize];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext4_volume_lives_through_stage_publish_and_back_idempotently() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("", Mode::SingleNodeWriter);

    let req = create_req("pvc-ext4", 64 * MIB, cap.clone());
    let vol = c
        .controller
        .create_volume(req.clone())
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(vol.capacity_bytes, 64 * MIB as i64);
    assert_eq!(
        vol.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    assert_eq!(
        vol.accessible_topology[0].segments["topology.nodekit.io/node"],
        "lab-node"
    );
    let again = c
        .controller
        .create_volume(req)
        .await
        .expect("create again")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        again, vol,
        "a repeated CreateVolume returns the same volume"
    );
    assert_eq!(lab.volume_images().len(), 1);

    let staging = lab.staging("pv-ext4");
    let target = lab.target("pod-a");
    for _ in 0..2 {
        c.stage(&vol, &staging, cap.clone()).await;
    }
    for _ in 0..2 {
        c.publish(&vol, &staging, &target, cap.clone(), false).await;
    }
    assert_eq!(
        lab.mounts().len(),
        2,
        "one staging mount and one bind, not stacked: {:?}",
        lab.mounts()
    );
    assert_eq!(lab.loops().len(), 1, "one loop device");

    write_file(&target.join("hello.txt"), b"kept across publishes");
    let err = fill(&target.join("big"));
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "writing past the volume size: {err}"
    );
    std::fs::remove_file(target.join("big")).expect("rm");

    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("stats")
        .into_inner();
    let bytes = &stats.usage[0];
    assert!(
        bytes.total > 40 * MIB as i64 && bytes.total <= 64 * MIB as i64,
        "{stats:?}"
    );
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");

    for _ in 0..2 {
        c.unpublish(&vol.volume_id, &target).await;
    }
    assert!(!target.exists(), "the target is removed");

    // Read-only publish at another target: data visible, writes refused.
    let target_ro = lab.target("pod-b");
    c.publish(&vol, &staging, &target_ro, cap.clone(), true)
        .await;
    let mut text = String::new();
    std::fs::File::open(target_ro.join("hello.txt"))
        .expect("open")
        .read_to_string(&mut text)
        .expect("read");
    assert_eq!(text, "kept across publishes");
    let err = std::fs::File::create(target_ro.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    c.unpublish(&vol.volume_id, &target_ro).await;

    for _ in 0..2 {
        c.unstage(&vol.volume_id, &staging).await;
    }
    lab.assert_clean();
    for _ in 0..2 {
        c.delete(&vol.volume_id).await;
    }
    assert!(lab.volume_images().is_empty());
    drop(c);
    assert!(driver.stop(), "clean exit on SIGTERM, socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_is_the_loop_device_at_the_target() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let vol = c.create("pvc-block", 32 * MIB, cap.clone()).await;
    assert!(!vol.volume_context.contains_key("fsType"));
    let staging = lab.staging("pv-block");
    let target = lab.target("pod-block");
    c.stage(&vol, &staging, cap.clone()).await;
    for _ in 0..2 {
        c.publish(&vol, &staging, &target, cap.clone(), false).await;
    }
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .expect("open device");
        dev.seek(SeekFrom::Start(5 * MIB)).expect("seek");
        dev.write_all(b"raw block data").expect("write");
        dev.sync_all().expect("sync");
        let size = dev.seek(SeekFrom::End(0)).expect("size");
        assert_eq!(size, 32 * MIB, "the device has the volume's size");
    }
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.usage[0].total, 32 * MIB as i64);
    c.unpublish(&vol.volume_id, &target).await;
    assert!(!target.exists());
    c.unstage(&vol.volume_id, &staging).await;
    lab.assert_clean();
    let image = &lab.volume_images()[0];
    let mut data = vec![0u8; 14];
    let mut f = std::fs::File::open(image).expect("image");
    f.seek(SeekFrom::Start(5 * MIB)).expect("seek");
    f.read_exact(&mut data).expect("read");
    assert_eq!(&data, b"raw block data", "the write reached the image");
    c.delete(&vol.volume_id).await;
}

/// Creates, stages and publishes a volume; returns (volume, staging, target).
async fn mounted(
    c: &mut Clients,
    lab: &Lab,
    name: &str,
    bytes: u64,
    cap: &VolumeCapability,
    source: Option<VolumeContentSource>,
) -> (Volume, std::path::PathBuf, std::path::PathBuf) {
    let mut req = create_req(name, bytes, cap.clone());
    req.volume_content_source = source;
    let vol = c
        .controller
        .create_volume(req)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let staging = lab.staging(name);
    let target = lab.target(name);
    c.stage(&vol, &staging, cap.clone()).await;
    c.publish(&vol, &staging, &target, cap.clone(), false).await;
    (vol, staging, target)
}

async fn teardown(c: &mut Clients, vol: &Volume, staging: &Path, target: &Path) {
    c.unpublish(&vol.volume_id, target).await;
    c.unstage(&vol.volume_id, staging).await;
    c.delete(&vol.volume_id).await;
}

fn snapshot_source(id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_on_an_xfs_pool_snapshots_by_reflink_restores_larger_and_grows_online() {
    let lab = Lab::new(Pool::Xfs(2048));
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("xfs", Mode::SingleNodeWriter);
    let (vol, staging, target) = mounted(&mut c, &lab, "pvc-xfs", 320 * MIB, &cap, None).await;
    let payload: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
    write_file(&target.join("data.bin"), &payload);

    let snap_req = CreateSnapshotRequest {
        source_volume_id: vol.volume_id.clone(),
        name: "snap-1".into(),
        ..Default::default()
    };
    let snap = c
        .controller
        .create_snapshot(snap_req.clone())
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snap");
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 320 * MIB as i64);
    let again = c
        .controller
        .create_snapshot(snap_req)
        .await
        .expect("again")
        .into_inner()
        .snapshot
        .expect("snap");
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert!(
        driver.log_text().contains("Reflink"),
        "reflink used on xfs: {}",
        driver.log_text()
    );

    // Restore into a larger volume: data intact, filesystem fills the new size.
    let (restored, r_staging, r_target) = mounted(
        &mut c,
        &lab,
        "pvc-restored",
        400 * MIB,
        &cap,
        snapshot_source(&snap.snapshot_id),
    )
    .await;
    assert_eq!(
        std::fs::read(r_target.join("data.bin")).expect("restored data"),
        payload
    );
    let (source_total, _) = fs_size(&target);
    let (total, _) = fs_size(&r_target);
    assert!(
        total >= source_total + 70 * MIB,
        "the restored xfs grew by the 80 MiB the new volume is larger: {source_total} -> {total}"
    );

    // Online expansion: controller grows the image, node grows the mounted xfs.
    let (before, _) = fs_size(&target);
    let exp = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 512 * MIB as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("controller expand")
        .into_inner();
    assert_eq!(exp.capacity_bytes, 512 * MIB as i64);
    assert!(exp.node_expansion_required);
    for _ in 0..2 {
        let n = c
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 512 * MIB as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("node expand")
            .into_inner();
        assert_eq!(n.capacity_bytes, 512 * MIB as i64);
    }
    let (after, _) = fs_size(&target);
    assert!(
        after > before + 150 * MIB,
        "the mounted xfs grew: {before} -> {after}"
    );

    teardown(&mut c, &restored, &r_staging, &r_target).await;
    teardown(&mut c, &vol, &staging, &target).await;
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete snapshot");
    assert!(lab.snapshot_images().is_empty());
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_on_an_ext4_pool_snapshots_by_copy_clones_and_grows_at_restage() {
    let lab = Lab::new(Pool::Ext4(1024));
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (vol, staging, target) = mounted(&mut c, &lab, "pvc-e", 64 * MIB, &cap, None).await;
    write_file(&target.join("note"), b"ext4 data");

    let snap = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap-e".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snap");
    assert!(
        driver.log_text().contains("Copy"),
        "copy fallback on ext4: {}",
        driver.log_text()
    );
    let (restored, rs, rt) = mounted(
        &mut c,
        &lab,
        "pvc-e-restore",
        64 * MIB,
        &cap,
        snapshot_source(&snap.snapshot_id),
    )
    .await;
    assert_eq!(
        std::fs::read(rt.join("note")).expect("restored"),
        b"ext4 data"
    );
    teardown(&mut c, &restored, &rs, &rt).await;

    let clone_src = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: vol.volume_id.clone(),
        })),
    });
    let (clone, cs, ct) = mounted(&mut c, &lab, "pvc-e-clone", 96 * MIB, &cap, clone_src).await;
    assert_eq!(
        std::fs::read(ct.join("note")).expect("cloned"),
        b"ext4 data"
    );
    let (total, _) = fs_size(&ct);
    assert!(
        total > 80 * MIB,
        "the clone's ext4 grew offline at stage: {total}"
    );
    teardown(&mut c, &clone, &cs, &ct).await;

    // Expansion: the image grows; the mounted ext4 grows online only with CAP_SYS_RESOURCE,
    // else FAILED_PRECONDITION naming it, and at the next stage.
    c.controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("controller expand");
    let node_expand = c
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: staging.display().to_string(),
            staging_target_path: staging.display().to_string(),
            ..Default::default()
        })
        .await;
    match node_expand {
        Ok(_) => assert!(
            has_cap_sys_resource(),
            "online ext4 growth cannot succeed without CAP_SYS_RESOURCE"
        ),
        Err(s) => {
            assert!(
                !has_cap_sys_resource(),
                "with CAP_SYS_RESOURCE online growth must work: {s:?}"
            );
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("CAP_SYS_RESOURCE"), "{}", s.message());
            c.unpublish(&vol.volume_id, &target).await;
            c.unstage(&vol.volume_id, &staging).await;
            c.stage(&vol, &staging, cap.clone()).await;
            c.publish(&vol, &staging, &target, cap.clone(), false).await;
        }
    }
    let (total, _) = fs_size(&target);
    assert!(total > 110 * MIB, "ext4 grew to the new size: {total}");
    assert_eq!(
        std::fs::read(target.join("note")).expect("still there"),
        b"ext4 data"
    );
    teardown(&mut c, &vol, &staging, &target).await;
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_volumes_created_and_staged_in_parallel_each_get_their_own_device() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let staged: Vec<_> = create_and_stage_in_parallel(&c, &lab, 20, 16 * MIB, &cap)
        .await
        .into_iter()
        .map(|r| r.expect("create + stage"))
        .collect();
    assert_eq!(lab.loops().len(), 20, "20 distinct loop devices");
    for (id, staging) in staged {
        c.unstage(&id, &staging).await;
        c.delete(&id).await;
    }
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info_describe_the_driver() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&[
        "--driver-name",
        "test.nodekit.io",
        "--max-volumes-per-node",
        "7",
    ]);
    let mut c = driver.clients().await;
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "test.nodekit.io");
    assert!(!info.vendor_version.is_empty());
    let probe = c
        .identity
        .probe(ProbeRequest {})
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let node = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    assert_eq!(node.node_id, "lab-node");
    assert_eq!(node.max_volumes_per_node, 7);
    assert_eq!(
        node.accessible_topology.expect("topology").segments["topology.nodekit.io/node"],
        "lab-node"
    );
}
