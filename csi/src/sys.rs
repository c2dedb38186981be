//! The kernel calls nix does not wrap: the loop-device ioctls, FICLONE, FIFREEZE/FITHAW and
//! statx's mount-root attribute.
//! The only module of the crate with `unsafe`; each wrapper takes typed, borrowed file
//! descriptors so callers stay safe.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control` (linux/loop.h).
const LOOP_CTL_GET_FREE: u32 = 0x4C82;
/// `LOOP_CONFIGURE`: set the backing file and parameters in one call (Linux >= 5.8).
const LOOP_CONFIGURE: u32 = 0x4C0A;
/// `LOOP_CLR_FD`: detach (deferred to the last close while other openers remain).
const LOOP_CLR_FD: u32 = 0x4C01;
/// `LOOP_SET_CAPACITY`: re-read the backing file's size.
const LOOP_SET_CAPACITY: u32 = 0x4C07;
/// `FIFREEZE` = `_IOWR('X', 119, int)`.
const FIFREEZE: u32 = 0xC004_5877;
/// `FITHAW` = `_IOWR('X', 120, int)`.
const FITHAW: u32 = 0xC004_5878;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

nix::ioctl_none_bad!(loop_ctl_get_free_raw, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(loop_configure_raw, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd_raw, LOOP_CLR_FD);
nix::ioctl_none_bad!(loop_set_capacity_raw, LOOP_SET_CAPACITY);
nix::ioctl_write_int_bad!(ficlone_raw, libc::FICLONE);
nix::ioctl_write_int_bad!(fifreeze_raw, FIFREEZE);
nix::ioctl_write_int_bad!(fithaw_raw, FITHAW);

/// Asks `/dev/loop-control` for a free loop device number (allocating one if none is free).
pub fn loop_ctl_get_free(control: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument; the fd is valid for the call.
    let n = unsafe { loop_ctl_get_free_raw(control.as_raw_fd()) }?;
    u32::try_from(n).map_err(|_| Errno::EINVAL)
}

/// Binds `backing` to the loop device open as `device`, read-write, with the kernel's
/// default block size and no flags (in particular not autoclear: see `loopdev`).
pub fn loop_configure(device: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> Result<(), Errno> {
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    let config = LoopConfig {
        fd,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised `struct loop_config` that outlives the call;
    // the kernel only reads it.
    unsafe { loop_configure_raw(device.as_raw_fd(), &config) }.map(drop)
}

/// Detaches the loop device open as `device` (the kernel finishes at the last close).
pub fn loop_clr_fd(device: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is valid for the call.
    unsafe { loop_clr_fd_raw(device.as_raw_fd()) }.map(drop)
}

/// Makes the loop device open as `device` re-read its backing file's size.
pub fn loop_set_capacity(device: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is valid for the call.
    unsafe { loop_set_capacity_raw(device.as_raw_fd()) }.map(drop)
}

/// Makes `dest` share `src`'s extents (reflink); EOPNOTSUPP/EXDEV/EINVAL where the
/// filesystem cannot.
pub fn ficlone(dest: impl AsFd, src: impl AsFd) -> Result<(), Errno> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are valid.
    unsafe { ficlone_raw(dest.as_fd().as_raw_fd(), src.as_fd().as_raw_fd()) }.map(drop)
}

/// Freezes the filesystem whose root directory is open as `dir` (flushes it and blocks
/// writers until [`thaw`]).
pub fn freeze(dir: impl AsFd) -> Result<(), Errno> {
    // SAFETY: FIFREEZE ignores its argument; the fd is valid for the call.
    unsafe { fifreeze_raw(dir.as_fd().as_raw_fd(), 0) }.map(drop)
}

/// Thaws a filesystem frozen by [`freeze`].
pub fn thaw(dir: impl AsFd) -> Result<(), Errno> {
    // SAFETY: FITHAW ignores its argument; the fd is valid for the call.
    unsafe { fithaw_raw(dir.as_fd().as_raw_fd(), 0) }.map(drop)
}

/// Whether `path` (not followed if a symlink) is the root of a mount: `Some(answer)`, or
/// `None` where the kernel does not report it (`STATX_ATTR_MOUNT_ROOT`, Linux >= 5.8).
pub fn is_mount_root(path: &Path) -> Result<Option<bool>, Errno> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is NUL-terminated and `buf` is a writable `struct statx` that outlives
    // the call.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            0,
            buf.as_mut_ptr(),
        )
    };
    Errno::result(rc)?;
    // SAFETY: statx succeeded, so the kernel filled `buf` (and it was zeroed before).
    let stx = unsafe { buf.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok((stx.stx_attributes_mask & bit != 0).then_some(stx.stx_attributes & bit != 0))
}
