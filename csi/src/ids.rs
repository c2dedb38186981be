//! Volume and snapshot IDs. An ID is derived from the CO's name (so a repeated CreateVolume
//! finds its volume without an index) and is the only thing that ever becomes a file name in
//! the pool or the state directory: [`VolumeId::parse`] accepts exactly the derived shape.

use sha2::{Digest, Sha256};

/// Hex digits after the prefix (128 bits of SHA-256).
const HEX_LEN: usize = 32;

fn derive(prefix: &str, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = String::with_capacity(prefix.len() + HEX_LEN);
    id.push_str(prefix);
    for b in &digest[..HEX_LEN / 2] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

fn well_formed(prefix: &str, s: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

macro_rules! id_type {
    ($name:ident, $prefix:literal, $what:literal) => {
        #[doc = concat!("A ", $what, " ID: `", $prefix, "` and 32 lowercase hex digits; safe as a file name.")]
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("The ID of the ", $what, " the CO calls `name`.")]
            pub fn for_name(name: &str) -> Self {
                Self(derive($prefix, name))
            }

            #[doc = concat!("Accepts a string only if it has the shape of a ", $what, " ID.")]
            pub fn parse(s: &str) -> Option<Self> {
                well_formed($prefix, s).then(|| Self(s.to_string()))
            }

            /// The ID as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(VolumeId, "nkv-", "volume");
id_type!(SnapshotId, "nks-", "snapshot");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_derived_from_names_and_parse_back() {
        let a = VolumeId::for_name("pvc-1");
        assert_eq!(a, VolumeId::for_name("pvc-1"));
        assert_ne!(a, VolumeId::for_name("pvc-2"));
        assert!(a.as_str().starts_with("nkv-"));
        assert_eq!(VolumeId::parse(a.as_str()), Some(a.clone()));
        let s = SnapshotId::for_name("pvc-1");
        assert!(s.as_str().starts_with("nks-"));
        assert_eq!(VolumeId::parse(s.as_str()), None, "kinds do not mix");
    }

    #[test]
    fn only_the_derived_shape_parses() {
        let good = VolumeId::for_name("x").to_string();
        for bad in [
            "",
            "nkv-",
            "../../etc/passwd",
            "nkv-../../../../../../../etc/pas",
            &good.to_uppercase(),
            &format!("{good}0"),
            &good[..good.len() - 1],
            &format!("{}/", &good[..good.len() - 1]),
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
    }
}
