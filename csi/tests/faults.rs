//! Crashes, leftovers and failures: the startup reconcile re-attaches and re-mounts what
//! staged volumes need, detaches loop devices nobody owns and clears interrupted creates;
//! a create that runs out of pool space leaves nothing. Needs root.

mod common;

use std::io::Write;

use common::*;
use nodekit_csi::loopdev::{KernelLoopDevices, LoopDevice, LoopDevices};
use nodekit_csi::mounter::{KernelMounter, Mounter};
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_crash_restores_staged_volumes_and_drops_orphans() {
    let lab = Lab::new(Pool::Plain);
    // A stale socket from an earlier run does not stop the driver.
    drop(std::os::unix::net::UnixListener::bind(lab.socket()).expect("stale socket"));
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let fs_cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let blk_cap = block_cap(Mode::SingleNodeWriter);

    let fs_vol = c.create("crash-fs", 32 * MIB, fs_cap.clone()).await;
    let blk_vol = c.create("crash-blk", 16 * MIB, blk_cap.clone()).await;
    let orphan = c.create("orphan", 16 * MIB, blk_cap.clone()).await;
    let fs_staging = lab.staging("crash-fs");
    let blk_staging = lab.staging("crash-blk");
    c.stage(&fs_vol, &fs_staging, fs_cap.clone()).await;
    c.stage(&blk_vol, &blk_staging, blk_cap.clone()).await;
    {
        let mut f = std::fs::File::create(fs_staging.join("survives")).expect("create");
        f.write_all(b"before the crash").expect("write");
        f.sync_all().expect("sync");
    }
    drop(c);
    driver.crash();

    // What a reboot would do to the kernel side, plus debris: the staged volumes lose their
    // mount and devices, an unstaged volume's image gets attached by someone, and a create
    // is left half-done.
    let loops = KernelLoopDevices::default();
    KernelMounter::default()
        .unmount(&fs_staging)
        .expect("unmount");
    for d in lab.loops() {
        loops.detach(d).expect("detach");
    }
    let orphan_image = lab
        .volume_images()
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&orphan.volume_id))
        .expect("orphan image");
    let orphan_dev = loops.attach(&orphan_image).expect("attach orphan");
    let half = "nkv-ffffffffffffffffffffffffffffffff";
    std::fs::write(lab.pool().join(format!("volumes/{half}.img")), b"partial")
        .expect("partial image");
    std::fs::write(
        lab.state().join(format!("volumes/{half}.json")),
        format!(r#"{{"id":"{half}","name":"half","capacity":1048576,"fsType":null,"parameters":{{}},"source":null,"phase":"creating"}}"#),
    )
    .expect("creating record");
    // A power loss tears what is written without fsync: a creating record, publications.
    let torn = "nkv-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
    std::fs::write(lab.pool().join(format!("volumes/{torn}.img")), b"partial")
        .expect("partial image");
    std::fs::write(lab.state().join(format!("volumes/{torn}.json")), b"").expect("torn");
    let publications = |id: &str| lab.state().join(format!("publications/{id}.json"));
    std::fs::write(publications(&fs_vol.volume_id), b"").expect("torn publications");
    std::fs::write(publications(&orphan.volume_id), b"{}").expect("stale publications");

    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let log = driver.log_text();
    assert!(
        !lab.loops().contains(&orphan_dev),
        "the orphan's device was detached: {log}"
    );
    assert_eq!(
        lab.loops().len(),
        2,
        "both staged volumes re-attached: {log}"
    );
    // The orphan took a number a staged volume had: the records now name the new devices.
    for vol in [&fs_vol, &blk_vol] {
        let record = std::fs::read(lab.state().join(format!("node/{}.json", vol.volume_id)))
            .expect("node record");
        let record: serde_json::Value = serde_json::from_slice(&record).expect("json");
        let device = record["loopDevice"].as_u64().expect("loopDevice") as u32;
        let backing = loops
            .backing(LoopDevice(device))
            .expect("sysfs")
            .expect("attached");
        assert!(
            backing.backing.to_string_lossy().contains(&vol.volume_id),
            "{record} names {backing:?}"
        );
    }
    assert_eq!(
        std::fs::read(fs_staging.join("survives")).expect("re-mounted staging"),
        b"before the crash"
    );
    assert!(
        !lab.pool().join(format!("volumes/{half}.img")).exists(),
        "partial image cleared"
    );
    assert!(
        !lab.state().join(format!("volumes/{half}.json")).exists(),
        "creating record cleared"
    );
    assert!(
        !lab.pool().join(format!("volumes/{torn}.img")).exists()
            && !lab.state().join(format!("volumes/{torn}.json")).exists(),
        "torn creating record cleared with its image: {log}"
    );
    assert!(
        !publications(&orphan.volume_id).exists(),
        "publications of an unstaged volume cleared: {log}"
    );
    assert!(orphan_image.exists(), "user data is never deleted");

    // The restored volumes work as before.
    let target = lab.target("after-crash");
    c.publish(&blk_vol, &blk_staging, &target, blk_cap.clone(), false)
        .await;
    c.unpublish(&blk_vol.volume_id, &target).await;
    for (vol, staging) in [(&fs_vol, &fs_staging), (&blk_vol, &blk_staging)] {
        c.unstage(&vol.volume_id, staging).await;
    }
    lab.assert_clean();
    for v in [&fs_vol, &blk_vol, &orphan] {
        c.delete(&v.volume_id).await;
    }
    assert!(lab.volume_images().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_runs_out_of_pool_space_leaves_nothing() {
    let lab = Lab::new(Pool::Ext4(72));
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = c.create("full", 48 * MIB, cap.clone()).await;
    let staging = lab.staging("full");
    c.stage(&vol, &staging, cap.clone()).await;
    {
        let mut f = std::fs::File::create(staging.join("data")).expect("create");
        let chunk: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
        for _ in 0..36 {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("sync");
    }
    let snap = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "too-big".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(snap),
        Code::ResourceExhausted,
        "the copy does not fit: {}",
        driver.log_text()
    );
    assert!(
        lab.snapshot_images().is_empty(),
        "no partial snapshot image"
    );
    let listed = c
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.entries.is_empty());
    // The source volume is untouched and thawed: still writable.
    std::fs::write(staging.join("after"), b"ok")
        .expect("volume writable after the failed snapshot");
    c.unstage(&vol.volume_id, &staging).await;
    c.delete(&vol.volume_id).await;
    lab.assert_clean();
}
