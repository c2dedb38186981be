//! Who a container's process runs as: the CRI security context's `run_as_user` /
//! `run_as_username` / `run_as_group`, else the image's `User`, resolved against the image's
//! own `/etc/passwd` and `/etc/group` (never the host's).

use std::path::Path;

use nodekit_proto::cri::v1::LinuxContainerSecurityContext;

/// The user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name absent from the image's `/etc/passwd`.
    #[error("user {name:?} not found in the image's /etc/passwd")]
    NoSuchUser {
        /// The name asked for.
        name: String,
    },
    /// A group name absent from the image's `/etc/group`.
    #[error("group {name:?} not found in the image's /etc/group")]
    NoSuchGroup {
        /// The name asked for.
        name: String,
    },
    /// A negative or oversized numeric ID.
    #[error("invalid user or group id {value}")]
    InvalidId {
        /// The value given.
        value: i64,
    },
}

/// The resolved identity of a container process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups (image group membership plus the pod's supplemental groups).
    pub additional_gids: Vec<u32>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn id(value: i64) -> Result<u32, UserError> {
    u32::try_from(value).map_err(|_| UserError::InvalidId { value })
}

/// Resolves the process user from the security context and the image's `User` string
/// (`uid`, `name`, `uid:gid`, `name:group`), reading the image's account files under `rootfs`.
pub fn resolve(
    rootfs: &Path,
    sc: Option<&LinuxContainerSecurityContext>,
    image_user: &str,
) -> Result<ProcessUser, UserError> {
    let read = |rel: &str| std::fs::read_to_string(rootfs.join(rel)).unwrap_or_default();
    let passwd = parse_passwd(&read("etc/passwd"));
    let groups = parse_group(&read("etc/group"));
    let (image_u, image_g) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };

    let by_name = |name: &str| {
        passwd
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| UserError::NoSuchUser {
                name: name.to_string(),
            })
    };
    let (uid, name) = match sc {
        Some(sc) if sc.run_as_user.is_some() => {
            (id(sc.run_as_user.as_ref().map_or(0, |v| v.value))?, None)
        }
        Some(sc) if !sc.run_as_username.is_empty() => {
            let p = by_name(&sc.run_as_username)?;
            (p.uid, Some(p.name.clone()))
        }
        _ if image_u.is_empty() => (0, None),
        _ => match image_u.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let p = by_name(image_u)?;
                (p.uid, Some(p.name.clone()))
            }
        },
    };
    let entry = passwd.iter().find(|p| p.uid == uid);
    let name = name.or_else(|| entry.map(|p| p.name.clone()));

    let gid = match (sc.and_then(|s| s.run_as_group.as_ref()), image_g) {
        (Some(g), _) => id(g.value)?,
        (None, Some(g)) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::NoSuchGroup {
                        name: g.to_string(),
                    })?
                    .gid
            }
        },
        _ => entry.map_or(0, |p| p.gid),
    };

    let mut additional: Vec<u32> = name
        .map(|n| {
            groups
                .iter()
                .filter(|g| g.members.contains(&n))
                .map(|g| g.gid)
                .collect()
        })
        .unwrap_or_default();
    for g in sc
        .map(|s| s.supplemental_groups.as_slice())
        .unwrap_or_default()
    {
        additional.push(id(*g)?);
    }
    additional.retain(|g| *g != gid);
    additional.sort_unstable();
    additional.dedup();
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids: additional,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::Int64Value;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nweb:x:1001:\nlog:x:2000:web,other\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn image_user_by_name_gets_primary_and_member_groups() {
        let r = rootfs();
        let u = resolve(r.path(), None, "web").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 1001, vec![2000]));
    }

    #[test]
    fn numeric_and_group_forms_resolve_and_unknown_names_fail() {
        let r = rootfs();
        assert_eq!(resolve(r.path(), None, "").unwrap(), ProcessUser::default());
        let u = resolve(r.path(), None, "4242:log").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 2000));
        assert!(matches!(
            resolve(r.path(), None, "ghost"),
            Err(UserError::NoSuchUser { .. })
        ));
        assert!(matches!(
            resolve(r.path(), None, "web:ghosts"),
            Err(UserError::NoSuchGroup { .. })
        ));
    }

    #[test]
    fn security_context_overrides_image_user_and_adds_supplemental_groups() {
        let r = rootfs();
        let sc = LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 7 }),
            supplemental_groups: vec![9, 7],
            ..Default::default()
        };
        let u = resolve(r.path(), Some(&sc), "root").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 7, vec![9, 2000]));
        let neg = LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: -1 }),
            ..Default::default()
        };
        assert!(matches!(
            resolve(r.path(), Some(&neg), ""),
            Err(UserError::InvalidId { value: -1 })
        ));
    }
}
