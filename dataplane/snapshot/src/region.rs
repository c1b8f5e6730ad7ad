//! The shared-memory region: a versioned header and two slots, published seqlock-style.
//!
//! ```text
//! offset 0     header (one page): magic, layout version, epoch, slot capacity,
//!              published generation, active slot, futex wake word, superseded flag
//! offset 4096  slot 0: seq, generation, length, crc32c, payload (slot capacity bytes)
//! ...          slot 1: same
//! ```
//!
//! The publisher writes the slot that is not active: it makes the slot's `seq` odd, copies the
//! payload, stores length and checksum, makes `seq` even again, then flips `active`, bumps the
//! generation and wakes waiters through a futex on the shared page. A reader copies the active
//! slot out and keeps the copy only if `seq` was even and unchanged around the copy and the
//! checksum matches. Nobody blocks anybody: a torn read is retried, a corrupt one refused.
//!
//! Each publisher instance creates a fresh file and renames it over the path, so a restarted
//! agent, or a snapshot that outgrew its slots, shows up as a new inode with a new epoch; the old
//! file is marked superseded so readers blocked on it wake at once. The file is never truncated
//! while mapped (that would turn reads into SIGBUS).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use memmap2::{Mmap, MmapMut, MmapOptions};

pub const MAGIC: [u8; 8] = *b"MESHSNAP";
/// Version of the byte layout described above (not of the protobuf schema).
pub const LAYOUT_VERSION: u32 = 1;
const HEADER_SIZE: usize = 4096;
const SLOT_HEADER_SIZE: usize = 64;
/// Default payload capacity per slot. The file is sparse on tmpfs, so unused capacity costs
/// no memory; it only bounds how large a snapshot can grow before the file is recreated.
pub const DEFAULT_SLOT_CAPACITY: u64 = 64 << 20;
/// Largest slot capacity a reader accepts; keeps every offset computation far from overflow.
const MAX_SLOT_CAPACITY: u64 = 1 << 40;
/// Torn reads in a row before a read gives up for now (the publisher is mid-write each time).
const READ_ATTEMPTS: usize = 64;

// Header field offsets.
const H_MAGIC: usize = 0;
const H_LAYOUT: usize = 8;
const H_FLAGS: usize = 12;
const H_EPOCH: usize = 16;
const H_SLOT_CAPACITY: usize = 24;
const H_GENERATION: usize = 32;
const H_ACTIVE: usize = 40;
const H_WAKE: usize = 44;
const H_CREATED_MS: usize = 48;
const FLAG_SUPERSEDED: u32 = 1;

// Slot header field offsets.
const S_SEQ: usize = 0;
const S_GENERATION: usize = 8;
const S_LEN: usize = 16;
const S_CRC: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("snapshot region {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot region {0}: bad magic (not a snapshot region)")]
    Magic(PathBuf),
    #[error("snapshot region {path}: layout version {found}, this build reads {LAYOUT_VERSION}")]
    Layout { path: PathBuf, found: u32 },
    #[error("snapshot region {path}: file is {len} bytes, header says it needs {need}")]
    Truncated { path: PathBuf, len: u64, need: u64 },
    #[error("snapshot region {path}: slot capacity {capacity} is not a multiple of 8 up to 1 TiB")]
    Capacity { path: PathBuf, capacity: u64 },
    #[error("snapshot region {path}: no snapshot published yet")]
    Empty { path: PathBuf },
    #[error("snapshot region {path}: generation {generation} has checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        path: PathBuf,
        generation: u64,
        found: u32,
        expected: u32,
    },
    #[error(
        "snapshot region {path}: generation {generation} claims {len} bytes, slots hold {capacity}"
    )]
    Length {
        path: PathBuf,
        generation: u64,
        len: u64,
        capacity: u64,
    },
    #[error("snapshot region {path}: publisher kept rewriting the slot; will retry")]
    Busy { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegionError + '_ {
    move |source| RegionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Identity of one published snapshot: which file instance, which generation in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub epoch: u64,
    pub generation: u64,
}

/// A view of a mapped region as atomics at fixed offsets.
struct Layout {
    base: *const u8,
    len: usize,
}

impl Layout {
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: in bounds and 8-aligned (mappings are page aligned, offsets are multiples of
        // 8, checked above); the memory lives as long as the mapping that `self` borrows from,
        // and AtomicU64 has the same layout as u64. Other processes only access it atomically.
        #[allow(unsafe_code)]
        unsafe {
            &*(self.base.add(offset) as *const AtomicU64)
        }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        #[allow(unsafe_code)]
        unsafe {
            &*(self.base.add(offset) as *const AtomicU32)
        }
    }

    fn slot_offset(slot: u32, capacity: u64) -> usize {
        HEADER_SIZE + slot as usize * (SLOT_HEADER_SIZE + capacity as usize)
    }
}

fn file_len_for(capacity: u64) -> u64 {
    HEADER_SIZE as u64 + 2 * (SLOT_HEADER_SIZE as u64 + capacity)
}

fn new_epoch() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 48)) | 1
}

/// Options for creating a region.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub slot_capacity: u64,
    /// Owner (uid, gid) of the file: the data plane's user. The file is mode 0600 because it
    /// holds private keys.
    pub owner: Option<(u32, u32)>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            slot_capacity: DEFAULT_SLOT_CAPACITY,
            owner: None,
        }
    }
}

/// The writing side, owned by ctrl-agent.
pub struct Publisher {
    path: PathBuf,
    map: MmapMut,
    options: PublishOptions,
    epoch: u64,
    generation: u64,
}

impl Publisher {
    /// Creates a fresh region at `path` (replacing any previous one atomically).
    pub fn create(
        path: impl AsRef<Path>,
        mut options: PublishOptions,
    ) -> Result<Self, RegionError> {
        let path = path.as_ref().to_owned();
        // Readers refuse capacities that would misalign the second slot's header.
        options.slot_capacity = options.slot_capacity.next_multiple_of(8);
        let (map, epoch) = Self::create_file(&path, &options)?;
        Ok(Publisher {
            path,
            map,
            options,
            epoch,
            generation: 0,
        })
    }

    fn create_file(path: &Path, options: &PublishOptions) -> Result<(MmapMut, u64), RegionError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        if let Some((uid, gid)) = options.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_err(&tmp))?;
        }
        file.set_len(file_len_for(options.slot_capacity))
            .map_err(io_err(&tmp))?;
        // SAFETY: the file was just created by us with O_EXCL and is never truncated while
        // mapped; other processes only touch the header atomics and read slots seqlock-style.
        #[allow(unsafe_code)]
        let mut map = unsafe { MmapOptions::new().map_mut(&file) }.map_err(io_err(&tmp))?;
        let epoch = new_epoch();
        map[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        map[H_LAYOUT..H_LAYOUT + 4].copy_from_slice(&LAYOUT_VERSION.to_ne_bytes());
        map[H_EPOCH..H_EPOCH + 8].copy_from_slice(&epoch.to_ne_bytes());
        map[H_SLOT_CAPACITY..H_SLOT_CAPACITY + 8]
            .copy_from_slice(&options.slot_capacity.to_ne_bytes());
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        map[H_CREATED_MS..H_CREATED_MS + 8].copy_from_slice(&created_ms.to_ne_bytes());
        map.flush().map_err(io_err(&tmp))?;

        // Remember the file we replace so its readers can be told to move on.
        let previous = File::open(path).ok();
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Some(old) = previous {
            mark_superseded(&old);
        }
        Ok((map, epoch))
    }

    fn layout(&self) -> Layout {
        Layout {
            base: self.map.as_ptr(),
            len: self.map.len(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> Version {
        Version {
            epoch: self.epoch,
            generation: self.generation,
        }
    }

    /// Publishes one payload (an encoded snapshot) as the next generation.
    pub fn publish(&mut self, payload: &[u8]) -> Result<Version, RegionError> {
        if payload.len() as u64 > self.options.slot_capacity {
            // Outgrown: move to a bigger file. Readers see a new inode and epoch.
            let mut capacity = self.options.slot_capacity.max(1 << 20);
            while capacity < payload.len() as u64 {
                capacity *= 2;
            }
            self.options.slot_capacity = capacity;
            let (map, epoch) = Self::create_file(&self.path, &self.options)?;
            self.map = map;
            self.epoch = epoch;
        }
        let capacity = self.options.slot_capacity;
        let layout = self.layout();
        let active = layout.u32_at(H_ACTIVE).load(Ordering::Relaxed);
        let generation = self.generation + 1;
        let slot = if generation == 1 { 0 } else { 1 - active };
        let offset = Layout::slot_offset(slot, capacity);
        let seq = layout.u64_at(offset + S_SEQ);
        let start = seq.load(Ordering::Relaxed) | 1;
        seq.store(start, Ordering::Relaxed);
        fence(Ordering::Release);
        let data_at = offset + SLOT_HEADER_SIZE;
        let len = payload.len();
        self.map[data_at..data_at + len].copy_from_slice(payload);
        let layout = self.layout();
        layout
            .u64_at(offset + S_GENERATION)
            .store(generation, Ordering::Relaxed);
        layout
            .u64_at(offset + S_LEN)
            .store(len as u64, Ordering::Relaxed);
        layout
            .u32_at(offset + S_CRC)
            .store(crc32c::crc32c(payload), Ordering::Relaxed);
        layout
            .u64_at(offset + S_SEQ)
            .store(start + 1, Ordering::Release);

        layout.u32_at(H_ACTIVE).store(slot, Ordering::Release);
        layout
            .u64_at(H_GENERATION)
            .store(generation, Ordering::Release);
        let wake = layout.u32_at(H_WAKE);
        wake.fetch_add(1, Ordering::Release);
        futex_wake(wake);
        self.generation = generation;
        Ok(self.version())
    }

    /// Test hook: flips a payload byte of the active slot without fixing the checksum, as a
    /// stray write or bad memory would.
    #[doc(hidden)]
    pub fn corrupt_active_slot_for_test(&mut self) {
        let layout = self.layout();
        let active = layout.u32_at(H_ACTIVE).load(Ordering::Relaxed);
        let at = Layout::slot_offset(active, self.options.slot_capacity) + SLOT_HEADER_SIZE;
        self.map[at] ^= 0xff;
        // A new generation number so readers look again.
        let gen = layout.u64_at(H_GENERATION);
        let next = gen.load(Ordering::Relaxed) + 1;
        layout
            .u64_at(Layout::slot_offset(active, self.options.slot_capacity) + S_GENERATION)
            .store(next, Ordering::Relaxed);
        gen.store(next, Ordering::Release);
        self.generation = next;
        let wake = layout.u32_at(H_WAKE);
        wake.fetch_add(1, Ordering::Release);
        futex_wake(wake);
    }
}

fn mark_superseded(file: &File) {
    let Ok(meta) = file.metadata() else { return };
    if meta.len() < HEADER_SIZE as u64 {
        return;
    }
    // SAFETY: the old region is never truncated; we touch only two header atomics.
    #[allow(unsafe_code)]
    let Ok(map) = (unsafe { MmapOptions::new().len(HEADER_SIZE).map_mut(file) }) else {
        return;
    };
    if map[H_MAGIC..H_MAGIC + 8] != MAGIC {
        return;
    }
    let layout = Layout {
        base: map.as_ptr(),
        len: map.len(),
    };
    layout
        .u32_at(H_FLAGS)
        .fetch_or(FLAG_SUPERSEDED, Ordering::Release);
    let wake = layout.u32_at(H_WAKE);
    wake.fetch_add(1, Ordering::Release);
    futex_wake(wake);
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 of a MAP_SHARED mapping (no PRIVATE flag, so
    // waiters in other processes are found). No memory is written by the kernel.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 of a shared mapping with a relative timeout;
    // returns at once if the word no longer holds `expected`. Spurious wakeups are fine.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

struct Mapped {
    map: Mmap,
    dev: u64,
    ino: u64,
    epoch: u64,
    capacity: u64,
}

impl Mapped {
    fn layout(&self) -> Layout {
        Layout {
            base: self.map.as_ptr(),
            len: self.map.len(),
        }
    }
}

/// What a read found.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Nothing newer than what this subscriber returned last.
    Unchanged,
    /// A new, checksum-verified payload.
    New { version: Version, payload: Vec<u8> },
}

/// The reading side, in the data plane. Takes no lock, ever; a reader that loses a race with
/// the publisher retries the copy.
pub struct Subscriber {
    path: PathBuf,
    mapped: Option<Mapped>,
    last: Option<Version>,
}

impl Subscriber {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Subscriber {
            path: path.as_ref().to_owned(),
            mapped: None,
            last: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps the file at the path if it is new (first call, agent restart, resized region).
    fn refresh_mapping(&mut self) -> Result<(), RegionError> {
        let path = self.path.clone();
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if let Some(m) = &self.mapped {
            let superseded =
                m.layout().u32_at(H_FLAGS).load(Ordering::Acquire) & FLAG_SUPERSEDED != 0;
            if m.dev == meta.dev() && m.ino == meta.ino() && !superseded {
                return Ok(());
            }
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len < HEADER_SIZE as u64 {
            return Err(RegionError::Truncated {
                path,
                len,
                need: HEADER_SIZE as u64,
            });
        }
        // SAFETY: publishers never truncate a region file; a reader validates every length it
        // reads from the header against the mapping before using it.
        #[allow(unsafe_code)]
        let map = unsafe { MmapOptions::new().map(&file) }.map_err(io_err(&path))?;
        if map[H_MAGIC..H_MAGIC + 8] != MAGIC {
            return Err(RegionError::Magic(path));
        }
        let layout = Layout {
            base: map.as_ptr(),
            len: map.len(),
        };
        let found = layout.u32_at(H_LAYOUT).load(Ordering::Acquire);
        if found != LAYOUT_VERSION {
            return Err(RegionError::Layout { path, found });
        }
        let epoch = layout.u64_at(H_EPOCH).load(Ordering::Acquire);
        let capacity = layout.u64_at(H_SLOT_CAPACITY).load(Ordering::Acquire);
        // Slot headers hold 8-byte atomics: a capacity that misaligns slot 1 is refused, not
        // trusted (found by the region_file fuzz target).
        if capacity > MAX_SLOT_CAPACITY || !capacity.is_multiple_of(8) {
            return Err(RegionError::Capacity { path, capacity });
        }
        let need = file_len_for(capacity);
        if len < need {
            return Err(RegionError::Truncated { path, len, need });
        }
        self.mapped = Some(Mapped {
            map,
            dev: meta.dev(),
            ino: meta.ino(),
            epoch,
            capacity,
        });
        Ok(())
    }

    /// Returns the newest snapshot if it is newer than the last one returned. A corrupt
    /// generation is reported once and then treated as seen, so the caller keeps its last good
    /// view without being told about the same bad bytes again.
    pub fn read(&mut self) -> Result<ReadOutcome, RegionError> {
        self.refresh_mapping()?;
        let Some(m) = &self.mapped else {
            return Err(RegionError::Empty {
                path: self.path.clone(),
            });
        };
        let layout = m.layout();
        for _ in 0..READ_ATTEMPTS {
            let generation = layout.u64_at(H_GENERATION).load(Ordering::Acquire);
            if generation == 0 {
                return Err(RegionError::Empty {
                    path: self.path.clone(),
                });
            }
            let version = Version {
                epoch: m.epoch,
                generation,
            };
            if self.last == Some(version) {
                return Ok(ReadOutcome::Unchanged);
            }
            let slot = layout.u32_at(H_ACTIVE).load(Ordering::Acquire) & 1;
            let offset = Layout::slot_offset(slot, m.capacity);
            let seq = layout.u64_at(offset + S_SEQ);
            let before = seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let slot_generation = layout.u64_at(offset + S_GENERATION).load(Ordering::Relaxed);
            let len = layout.u64_at(offset + S_LEN).load(Ordering::Relaxed);
            let expected = layout.u32_at(offset + S_CRC).load(Ordering::Relaxed);
            if len > m.capacity {
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) != before {
                    continue;
                }
                self.last = Some(version);
                return Err(RegionError::Length {
                    path: self.path.clone(),
                    generation,
                    len,
                    capacity: m.capacity,
                });
            }
            let data_at = offset + SLOT_HEADER_SIZE;
            let payload = m.map[data_at..data_at + len as usize].to_vec();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) != before || slot_generation != generation {
                // The publisher moved on while we copied; take the newer one.
                continue;
            }
            self.last = Some(version);
            let found = crc32c::crc32c(&payload);
            if found != expected {
                return Err(RegionError::Checksum {
                    path: self.path.clone(),
                    generation,
                    found,
                    expected,
                });
            }
            return Ok(ReadOutcome::New { version, payload });
        }
        Err(RegionError::Busy {
            path: self.path.clone(),
        })
    }

    /// Blocks the calling thread until the publisher signals a change or `timeout` passes.
    /// Call it between reads; it returns at once if something was published since `read`.
    pub fn wait(&self, timeout: Duration) {
        match &self.mapped {
            Some(m) => {
                let layout = m.layout();
                let wake = layout.u32_at(H_WAKE);
                let seen = wake.load(Ordering::Acquire);
                let published = layout.u64_at(H_GENERATION).load(Ordering::Acquire);
                let superseded = layout.u32_at(H_FLAGS).load(Ordering::Acquire) & FLAG_SUPERSEDED;
                let current = Version {
                    epoch: m.epoch,
                    generation: published,
                };
                if superseded == 0 && self.last == Some(current) {
                    futex_wait(wake, seen, timeout);
                }
            }
            None => std::thread::sleep(timeout.min(Duration::from_millis(100))),
        }
    }
}

#[cfg(test)]
mod tests;
