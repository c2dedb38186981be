//! CSI volume capabilities, checked and reduced to what the driver acts on: the access type
//! (filesystem of a type with mount flags, or raw block) and a single-node access mode.

use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::volume_capability::AccessType;
use nodekit_proto::csi::v1::VolumeCapability;

use crate::error::CsiError;
use crate::fstools::FsType;
use crate::mounter::MountOptions;

/// The access type a capability asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem; `fs_type` `None` means "whatever the volume has, else the default".
    Mount {
        /// The filesystem asked for.
        fs_type: Option<FsType>,
        /// Mount flags, validated.
        mount_flags: Vec<String>,
    },
    /// The raw device.
    Block,
}

/// A checked capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The access type.
    pub access: Access,
    /// The access mode (a single-node one).
    pub mode: Mode,
}

impl Capability {
    /// Checks `cap` (the field `field` of a request): access type and a supported access
    /// mode present, filesystem known, mount flags acceptable.
    pub fn parse(field: &str, cap: Option<&VolumeCapability>) -> Result<Self, CsiError> {
        let cap = cap.ok_or_else(|| CsiError::missing(field))?;
        let access = match &cap.access_type {
            None => {
                return Err(CsiError::InvalidArgument(format!(
                    "{field}: access_type (mount or block) is required"
                )))
            }
            Some(AccessType::Block(_)) => Access::Block,
            Some(AccessType::Mount(m)) => {
                MountOptions::parse(&m.mount_flags)?;
                if !m.volume_mount_group.is_empty() {
                    return Err(CsiError::InvalidArgument(format!(
                        "{field}: volume_mount_group is not supported"
                    )));
                }
                Access::Mount {
                    fs_type: FsType::parse(&m.fs_type)?,
                    mount_flags: m.mount_flags.clone(),
                }
            }
        };
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .filter(|m| *m != Mode::Unknown)
            .ok_or_else(|| {
                CsiError::InvalidArgument(format!("{field}: access_mode is required"))
            })?;
        if !supported(mode) {
            return Err(CsiError::InvalidArgument(format!(
                "{field}: access mode {} is not supported: volumes are local to one node",
                mode.as_str_name()
            )));
        }
        Ok(Self { access, mode })
    }

    /// Whether publishing is read-only by mode alone.
    pub fn read_only_mode(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }
}

/// The access modes a local volume supports.
pub fn supported(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

#[cfg(test)]
mod tests {
    use nodekit_proto::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    use super::*;

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str, flags: &[&str]) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        }))
    }

    #[test]
    fn single_node_mount_and_block_capabilities_parse() {
        let c = Capability::parse(
            "c",
            Some(&cap(Mode::SingleNodeWriter, mount("xfs", &["noatime"]))),
        )
        .expect("ok");
        assert_eq!(
            c.access,
            Access::Mount {
                fs_type: Some(FsType::Xfs),
                mount_flags: vec!["noatime".into()]
            }
        );
        let b = Capability::parse(
            "c",
            Some(&cap(
                Mode::SingleNodeReaderOnly,
                Some(AccessType::Block(BlockVolume {})),
            )),
        )
        .expect("ok");
        assert_eq!(b.access, Access::Block);
        assert!(b.read_only_mode());
    }

    #[test]
    fn missing_parts_multi_node_modes_and_bad_flags_are_invalid() {
        let invalid = |c: Option<&VolumeCapability>| {
            Capability::parse("c", c).map_err(|e| e.code()) == Err(tonic::Code::InvalidArgument)
        };
        assert!(invalid(None));
        assert!(invalid(Some(&cap(Mode::SingleNodeWriter, None))));
        assert!(invalid(Some(&cap(Mode::Unknown, mount("", &[])))));
        assert!(invalid(Some(&cap(
            Mode::MultiNodeMultiWriter,
            mount("", &[])
        ))));
        assert!(invalid(Some(&cap(
            Mode::SingleNodeWriter,
            mount("btrfs", &[])
        ))));
        assert!(invalid(Some(&cap(
            Mode::SingleNodeWriter,
            mount("", &["bind"])
        ))));
    }
}
