//! The disk file of a store's disk tier: where the payloads of disk chunks live (layout in
//! [`crate::protocol::store_layout`], "disk chunk").
//!
//! Owns: creating the file in the configured directory, unlinked from the start
//! (`O_TMPFILE`), so it disappears when its last descriptor closes (the monitor's and the
//! shims', even after a SIGKILL), giving the space of an empty disk chunk back
//! (`fallocate(PUNCH_HOLE)`), and the synchronous read the store falls back to
//! ([`DiskFile::read_exact_at`], `pread`). Batched reads and writes through io_uring are the
//! monitor's (`monitor/diskio.rs`): they run without the store's lock.
//! Must not touch: slab bookkeeping, records, compression, uffd, processes.
//!
//! A file system without `O_TMPFILE` gets a named file (`.uswap-disk-<pid>-<n>`, mode 0600)
//! that is unlinked right after it is opened; names a dead monitor left in that instant are
//! removed the next time a disk file is made in the directory.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of the named files made where `O_TMPFILE` is not supported.
const NAMED_PREFIX: &str = ".uswap-disk-";

/// A disk tier's file, open read-write.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    dir: PathBuf,
}

impl DiskFile {
    /// Creates an unlinked file in `dir` (see the module doc).
    pub fn create(dir: &Path) -> std::io::Result<DiskFile> {
        let file = match open_tmpfile(dir) {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) =>
            {
                open_named_unlinked(dir)?
            }
            Err(e) => return Err(e),
        };
        Ok(DiskFile {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// The disk file of a store whose monitor died, handed over by the program that holds it
    /// too (an adoption). It must be what [`DiskFile::create`] makes: a regular file with no
    /// name left (so it is no one's named file the program could have opened), open for
    /// reading and writing. Its directory is read back from the kernel, for the status only.
    pub fn adopt(file: File) -> Result<DiskFile, String> {
        use std::os::unix::fs::MetadataExt;
        let meta = file
            .metadata()
            .map_err(|e| format!("fstat of the disk file: {e}"))?;
        if !meta.file_type().is_file() {
            return Err("the disk file handed over is not a regular file".into());
        }
        if meta.nlink() != 0 {
            return Err(format!(
                "the disk file handed over still has a name ({} links): a disk tier's file is unlinked from the start",
                meta.nlink()
            ));
        }
        // SAFETY: fcntl(F_GETFL) on a descriptor we hold.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
            return Err("the disk file handed over is not open for reading and writing".into());
        }
        // Where it was made: the kernel still knows its directory ("<dir>/#<inode> (deleted)").
        let dir = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("(adopted)"));
        Ok(DiskFile { file, dir })
    }

    /// The open file (for io_uring reads and writes, and for the shim's copy).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The directory it was made in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `buf.len()` bytes at `off` with `pread` (the store's fallback when a disk page is
    /// read under its lock; the fault path reads through io_uring without it).
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    /// Gives the blocks of `[off, off + len)` back to the file system; the file keeps its
    /// size. A failure is logged (the space stays used until the file is closed).
    pub fn punch(&self, off: u64, len: u64) {
        // SAFETY: fallocate on our own descriptor; PUNCH_HOLE|KEEP_SIZE changes no size and
        // frees only the range, which holds no live payload.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        if rc != 0 {
            tracing::warn!(
                off,
                len,
                error = %std::io::Error::last_os_error(),
                "store: punching an empty disk chunk out of the disk file failed (the space stays used until the program exits)"
            );
        }
    }

    /// Bytes the file system has allocated to the file (`st_blocks`), 0 if unknown.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

fn open_tmpfile(dir: &Path) -> std::io::Result<File> {
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open(2) with a NUL-terminated path and constant flags; the result is checked.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A file system without `O_TMPFILE`: a new named file, unlinked at once. Names a dead monitor
/// left between its open and its unlink are removed first.
fn open_named_unlinked(dir: &Path) -> std::io::Result<File> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    remove_stale_named(dir);
    let name = format!(
        "{NAMED_PREFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// Removes `.uswap-disk-<pid>-<n>` files of processes that no longer exist.
fn remove_stale_named(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(NAMED_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfile_has_no_name_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskFile::create(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        d.file().write_all_at(b"hello disk", 8192).unwrap();
        let mut buf = [0u8; 10];
        d.read_exact_at(&mut buf, 8192).unwrap();
        assert_eq!(&buf, b"hello disk");
        d.punch(8192, 4096);
        d.read_exact_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [0u8; 10], "a punched range reads as zeros");
    }

    #[test]
    fn stale_named_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 0x7fff_fff0 does not exist.
        let stale = dir.path().join(format!("{NAMED_PREFIX}2147483632-0"));
        let mine = dir
            .path()
            .join(format!("{NAMED_PREFIX}{}-99", std::process::id()));
        let other = dir.path().join("unrelated");
        for p in [&stale, &mine, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let f = open_named_unlinked(dir.path()).unwrap();
        drop(f);
        assert!(!stale.exists());
        assert!(mine.exists() && other.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
