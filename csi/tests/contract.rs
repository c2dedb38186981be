//! The spec's error codes and idempotency rules, RPC by RPC, against the real binary.
//! Needs root (staging mounts a volume).

mod common;

use std::collections::HashMap;

use common::*;
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::volume_content_source::{SnapshotSource, Type as SourceType};
use nodekit_proto::csi::v1::*;
use tonic::Code;

const UNKNOWN_VOLUME: &str = "nkv-00000000000000000000000000000000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_calls_return_the_spec_codes() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&["--max-capacity", &(512 * MIB).to_string()]);
    let mut c = driver.clients().await;
    let cap = mount_cap("", Mode::SingleNodeWriter);
    let ctl = &mut c.controller;

    // CreateVolume argument checks.
    let mut no_name = create_req("", 64 * MIB, cap.clone());
    assert_eq!(
        code(ctl.create_volume(no_name.clone()).await),
        Code::InvalidArgument
    );
    no_name.name = "x".into();
    no_name.volume_capabilities.clear();
    assert_eq!(
        code(ctl.create_volume(no_name).await),
        Code::InvalidArgument,
        "no capabilities"
    );
    let multi = create_req("multi", 64 * MIB, mount_cap("", Mode::MultiNodeMultiWriter));
    assert_eq!(
        code(ctl.create_volume(multi).await),
        Code::InvalidArgument,
        "multi-node mode"
    );
    let mut typo = create_req("typo", 64 * MIB, cap.clone());
    typo.parameters.insert("fstype".into(), "xfs".into());
    assert_eq!(
        code(ctl.create_volume(typo).await),
        Code::InvalidArgument,
        "unknown parameter"
    );
    let small_xfs = create_req(
        "small-xfs",
        200 * MIB,
        mount_cap("xfs", Mode::SingleNodeWriter),
    );
    assert_eq!(
        code(ctl.create_volume(small_xfs).await),
        Code::OutOfRange,
        "xfs under 300 MiB"
    );
    let huge = create_req("huge", 4096 * MIB, cap.clone());
    assert_eq!(
        code(ctl.create_volume(huge).await),
        Code::OutOfRange,
        "beyond --max-capacity"
    );
    let mut elsewhere = create_req("elsewhere", 64 * MIB, cap.clone());
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([("topology.nodekit.io/node".into(), "other-node".into())]),
        }],
        preferred: Vec::new(),
    });
    assert_eq!(
        code(ctl.create_volume(elsewhere).await),
        Code::ResourceExhausted,
        "topology excludes us"
    );
    let mut from_nothing = create_req("from-nothing", 64 * MIB, cap.clone());
    from_nothing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "nks-00000000000000000000000000000000".into(),
        })),
    });
    assert_eq!(
        code(ctl.create_volume(from_nothing).await),
        Code::NotFound,
        "unknown source snapshot"
    );
    assert!(
        lab.volume_images().is_empty(),
        "failed creates leave no image: {:?}",
        lab.volume_images()
    );

    // Capacity: 512 MiB in all; two 200 MiB volumes fit, a third does not.
    let a = ctl
        .create_volume(create_req("a", 200 * MIB, cap.clone()))
        .await
        .expect("a")
        .into_inner()
        .volume
        .expect("v");
    let b = ctl
        .create_volume(create_req("b", 200 * MIB, cap.clone()))
        .await
        .expect("b")
        .into_inner()
        .volume
        .expect("v");
    assert_eq!(
        code(
            ctl.create_volume(create_req("c", 200 * MIB, cap.clone()))
                .await
        ),
        Code::ResourceExhausted
    );
    let capacity = ctl
        .get_capacity(GetCapacityRequest::default())
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(capacity.available_capacity, 112 * MIB as i64);
    assert_eq!(capacity.maximum_volume_size, Some(112 * MIB as i64));
    let mut xfs_capacity = GetCapacityRequest::default();
    xfs_capacity
        .parameters
        .insert("fsType".into(), "xfs".into());
    let x = ctl
        .get_capacity(xfs_capacity)
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(x.minimum_volume_size, Some(300 * MIB as i64));

    // Same name, other size: ALREADY_EXISTS.
    assert_eq!(
        code(
            ctl.create_volume(create_req("a", 100 * MIB + 4096, cap.clone()))
                .await
        ),
        Code::Ok,
        "smaller fits"
    );
    assert_eq!(
        code(
            ctl.create_volume(create_req("a", 300 * MIB, cap.clone()))
                .await
        ),
        Code::AlreadyExists
    );
    let mut other_fs = create_req("a", 200 * MIB, mount_cap("xfs", Mode::SingleNodeWriter));
    other_fs.name = "a".into();
    assert_eq!(code(ctl.create_volume(other_fs).await), Code::AlreadyExists);

    // Paging.
    let page1 = ctl
        .list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page1.entries.len(), 1);
    assert!(!page1.next_token.is_empty());
    let page2 = ctl
        .list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: page1.next_token.clone(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_token.is_empty());
    let mut ids: Vec<String> = page1
        .entries
        .iter()
        .chain(&page2.entries)
        .map(|e| e.volume.as_ref().expect("v").volume_id.clone())
        .collect();
    ids.sort();
    let mut want = vec![a.volume_id.clone(), b.volume_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    let bad_token = ListVolumesRequest {
        max_entries: 1,
        starting_token: "garbage".into(),
    };
    assert_eq!(code(ctl.list_volumes(bad_token).await), Code::Aborted);
    let bad_snap_token = ListSnapshotsRequest {
        starting_token: "garbage".into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.list_snapshots(bad_snap_token).await),
        Code::Aborted
    );

    // Other RPCs' checks.
    assert_eq!(
        code(ctl.delete_volume(delete_req("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.delete_volume(delete_req(UNKNOWN_VOLUME)).await),
        Code::Ok,
        "unknown ID deletes OK"
    );
    assert_eq!(
        code(ctl.delete_volume(delete_req("../../etc")).await),
        Code::Ok,
        "foreign ID deletes OK"
    );
    let get = |id: &str| ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    assert_eq!(
        code(ctl.controller_get_volume(get("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.controller_get_volume(get(UNKNOWN_VOLUME)).await),
        Code::NotFound
    );
    let got = ctl
        .controller_get_volume(get(&a.volume_id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.volume.expect("v").volume_id, a.volume_id);
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("", vec![cap.clone()]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate(&a.volume_id, vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate(UNKNOWN_VOLUME, vec![cap.clone()]))
                .await
        ),
        Code::NotFound
    );
    let ok = ctl
        .validate_volume_capabilities(validate(&a.volume_id, vec![cap.clone()]))
        .await
        .expect("validate")
        .into_inner();
    assert!(ok.confirmed.is_some());
    let multi = ctl
        .validate_volume_capabilities(validate(
            &a.volume_id,
            vec![mount_cap("", Mode::MultiNodeMultiWriter)],
        ))
        .await
        .expect("validate")
        .into_inner();
    assert!(multi.confirmed.is_none() && !multi.message.is_empty());
    let expand = |id: &str, bytes: Option<i64>| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: bytes.map(|b| CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.controller_expand_volume(expand("", Some(1))).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(expand(&a.volume_id, None))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(expand(UNKNOWN_VOLUME, Some(1)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(expand(&a.volume_id, Some(1)))
                .await
        ),
        Code::Ok,
        "already large enough"
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(expand(&a.volume_id, Some(4096 * MIB as i64)))
                .await
        ),
        Code::OutOfRange
    );
    let snap = |src: &str, name: &str| CreateSnapshotRequest {
        source_volume_id: src.into(),
        name: name.into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.create_snapshot(snap("", "s")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(snap(&a.volume_id, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(snap(UNKNOWN_VOLUME, "s")).await),
        Code::NotFound
    );
    let s = ctl
        .create_snapshot(snap(&a.volume_id, "s"))
        .await
        .expect("snap")
        .into_inner()
        .snapshot
        .expect("s");
    assert_eq!(
        code(ctl.create_snapshot(snap(&b.volume_id, "s")).await),
        Code::AlreadyExists,
        "name reused for another source"
    );
    let by_source = ctl
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: a.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_source.entries.len(), 1);
    let del_snap = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.delete_snapshot(del_snap("")).await),
        Code::InvalidArgument
    );
    // Snapshots are independent of their source: deleting the volume keeps the snapshot.
    ctl.delete_volume(delete_req(&a.volume_id))
        .await
        .expect("delete a");
    let listed = ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    for _ in 0..2 {
        ctl.delete_snapshot(del_snap(&s.snapshot_id))
            .await
            .expect("delete snapshot");
    }
    ctl.delete_volume(delete_req(&b.volume_id))
        .await
        .expect("delete b");
    assert!(lab.volume_images().is_empty() && lab.snapshot_images().is_empty());
    assert_eq!(
        code(
            ctl.controller_publish_volume(ControllerPublishVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_calls_return_the_spec_codes_and_confine_paths() {
    let lab = Lab::new(Pool::Plain);
    let driver = lab.start(&[]);
    let mut c = driver.clients().await;
    let cap = mount_cap("ext4", Mode::SingleNodeSingleWriter);
    let vol = c.create("n", 32 * MIB, cap.clone()).await;
    let staging = lab.staging("n");
    let target = lab.target("pod-1");
    let node = &mut c.node;

    // Stage argument checks.
    let mut r = stage_req(&vol, &staging, cap.clone());
    r.volume_id.clear();
    assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = stage_req(&vol, &staging, cap.clone());
    r.staging_target_path.clear();
    assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = stage_req(&vol, &staging, cap.clone());
    r.volume_capability = None;
    assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = stage_req(&vol, &staging, cap.clone());
    r.volume_id = UNKNOWN_VOLUME.into();
    assert_eq!(code(node.node_stage_volume(r).await), Code::NotFound);
    for bad in [
        "relative/path".to_string(),
        "/etc/outside".to_string(),
        format!("{}/../../etc", lab.kubelet().display()),
    ] {
        let mut r = stage_req(&vol, &staging, cap.clone());
        r.staging_target_path = bad.clone();
        assert_eq!(
            code(node.node_stage_volume(r).await),
            Code::InvalidArgument,
            "{bad}"
        );
    }
    let escape = lab.kubelet().join("escape");
    std::os::unix::fs::symlink("/tmp", &escape).expect("symlink");
    let mut r = stage_req(&vol, &staging, cap.clone());
    r.staging_target_path = escape.join("x").display().to_string();
    assert_eq!(
        code(node.node_stage_volume(r).await),
        Code::InvalidArgument,
        "symlink escape"
    );
    let wrong_fs = stage_req(
        &vol,
        &staging,
        mount_cap("xfs", Mode::SingleNodeSingleWriter),
    );
    assert_eq!(
        code(node.node_stage_volume(wrong_fs).await),
        Code::FailedPrecondition,
        "volume holds ext4"
    );
    lab.assert_clean();

    // Publish before stage: FAILED_PRECONDITION; missing staging path too.
    let publish = publish_req(&vol, &staging, &target, cap.clone(), false);
    assert_eq!(
        code(node.node_publish_volume(publish.clone()).await),
        Code::FailedPrecondition
    );
    let mut r = publish.clone();
    r.staging_target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(r).await),
        Code::FailedPrecondition
    );
    let mut r = publish.clone();
    r.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(r).await),
        Code::InvalidArgument
    );

    node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .expect("stage");
    let other_staging = lab.staging("n-other");
    assert_eq!(
        code(
            node.node_stage_volume(stage_req(&vol, &other_staging, cap.clone()))
                .await
        ),
        Code::FailedPrecondition,
        "already staged elsewhere"
    );
    let block_at_same = stage_req(&vol, &staging, block_cap(Mode::SingleNodeSingleWriter));
    assert_eq!(
        code(node.node_stage_volume(block_at_same).await),
        Code::AlreadyExists,
        "incompatible restage"
    );
    node.node_publish_volume(publish.clone())
        .await
        .expect("publish");
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), true))
                .await
        ),
        Code::AlreadyExists,
        "same target, other readonly"
    );
    let second = lab.target("pod-2");
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&vol, &staging, &second, cap.clone(), false))
                .await
        ),
        Code::FailedPrecondition,
        "SINGLE_NODE_SINGLE_WRITER at a second target"
    );
    assert_eq!(
        code(c.controller.delete_volume(delete_req(&vol.volume_id)).await),
        Code::FailedPrecondition,
        "in use"
    );

    // Stats and expand checks.
    let node = &mut c.node;
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let t = target.display().to_string();
    assert_eq!(
        code(node.node_get_volume_stats(stats("", &t)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_get_volume_stats(stats(&vol.volume_id, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_get_volume_stats(stats(UNKNOWN_VOLUME, &t)).await),
        Code::NotFound
    );
    let elsewhere = lab.kubelet().join("not-this-volume").display().to_string();
    assert_eq!(
        code(
            node.node_get_volume_stats(stats(&vol.volume_id, &elsewhere))
                .await
        ),
        Code::NotFound
    );
    let healthy = node
        .node_get_volume_stats(stats(&vol.volume_id, &t))
        .await
        .expect("stats")
        .into_inner();
    let condition = healthy
        .volume_condition
        .expect("VOLUME_CONDITION is offered");
    assert!(!condition.abnormal, "{condition:?}");
    let nexp = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(
        code(node.node_expand_volume(nexp("", &t)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_expand_volume(nexp(&vol.volume_id, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_expand_volume(nexp(UNKNOWN_VOLUME, &t)).await),
        Code::NotFound
    );
    let mut too_big = nexp(&vol.volume_id, &t);
    too_big.capacity_range = Some(CapacityRange {
        required_bytes: 1 << 40,
        limit_bytes: 0,
    });
    assert_eq!(
        code(node.node_expand_volume(too_big).await),
        Code::OutOfRange,
        "larger than the image"
    );
    assert_eq!(
        code(node.node_expand_volume(nexp(&vol.volume_id, &t)).await),
        Code::Ok,
        "already large enough"
    );

    // Unpublish of an unknown volume still unmounts and removes the target.
    let r = unpublish_req(UNKNOWN_VOLUME, &target);
    node.node_unpublish_volume(r)
        .await
        .expect("unpublish by unknown id");
    assert!(!target.exists());
    // The volume's record still names that target, now gone: its condition says so.
    let gone = node
        .node_get_volume_stats(stats(&vol.volume_id, &t))
        .await
        .expect("stats")
        .into_inner();
    let condition = gone.volume_condition.expect("condition");
    assert!(
        condition.abnormal && condition.message.contains("not mounted"),
        "{condition:?}"
    );
    assert_eq!(
        code(node.node_unpublish_volume(unpublish_req("", &target)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_unstage_volume(unstage_req("", &staging)).await),
        Code::InvalidArgument
    );
    let mut r = unstage_req(&vol.volume_id, &staging);
    r.staging_target_path.clear();
    assert_eq!(
        code(node.node_unstage_volume(r).await),
        Code::InvalidArgument
    );
    node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("unstage");
    lab.assert_clean();
    c.delete(&vol.volume_id).await;
}
