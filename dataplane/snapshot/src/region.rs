//! The shared-memory region: a versioned header and two slots, each holding a complete snapshot
//! (the base) followed by an append-only log of deltas.
//!
//! ```text
//! offset 0     header (one page): magic, layout version, epoch, slot capacity,
//!              published generation, active slot, futex wake word, superseded flag
//! offset 4096  slot 0: seq, base generation, stored base length, base crc32c, log length,
//!              decoded base length, base codec, then the stored base, then log records
//!              (slot capacity bytes in all)
//! ...          slot 1: same
//! log record:  length u32, crc32c u32, generation u64, payload, padding to 8 bytes
//! ```
//!
//! A change is one record appended to the active slot's log: the publisher writes it past the
//! published log length, then publishes the new length and the new generation and wakes
//! waiters through a futex on the shared page. Bytes below the published length are never
//! rewritten while the slot is active, so a reader copies only what it has not seen: a
//! one-pod change costs a record, not a re-encode of the world.
//!
//! A complete snapshot (first publish, compaction of a long log, a change too big for the log)
//! is stored as is up to `PublishOptions::compress_from` bytes, and LZ4-compressed above (a
//! block, or as is where that does not shrink it): a snapshot repeats its namespaces, nodes,
//! accounts and label keys on every workload, and at cluster scale the region must hold two
//! bases at once during a compaction. Its checksum covers the stored bytes, the decoded length
//! and the codec, and is checked before anything is decompressed. It goes to the slot that is
//! not active, seqlock style: `seq` odd, payload, length, checksum, `seq` even, then `active`
//! flips. The slot left behind has its `seq` made odd and its pages returned to the kernel, so
//! in steady state only one slot occupies memory. A reader keeps what it read (the log copied,
//! a compressed base decoded from where it lies) only if its slot's `seq` was even and
//! unchanged around the read and every checksum matches. A base stored as is is not copied at
//! all: the reader hands out the mapped bytes, and whoever reads them checks
//! [`Payload::intact`] afterwards, which holds while that slot's `seq` is unchanged. Nobody
//! blocks anybody: a torn read is retried, a corrupt one refused.
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
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use memmap2::{Mmap, MmapMut, MmapOptions};

pub const MAGIC: [u8; 8] = *b"MESHSNAP";
/// Version of the byte layout described above (not of the protobuf schema). 2 added the log,
/// 3 the compressed base.
pub const LAYOUT_VERSION: u32 = 3;
const HEADER_SIZE: usize = 4096;
const SLOT_HEADER_SIZE: usize = 64;
/// Default payload capacity per slot. The file is sparse on tmpfs, so unused capacity costs
/// no memory; it only bounds how large a snapshot can grow before the file is recreated.
pub const DEFAULT_SLOT_CAPACITY: u64 = 64 << 20;
/// Default size from which a complete snapshot is stored compressed (about 175k workloads).
/// Below it the region is at most about 80 MiB even during a compaction with a full log (2.5
/// bases), a third of the chart's 256 MiB, and a reader builds straight from the mapping: at
/// 100k workloads a new reader's read then takes 2-3 ms instead of 10-12 ms for LZ4 and the
/// fresh memory it decodes into (bench-results/README.md). Above it, compression is what
/// keeps 1M workloads under 256 MiB.
pub const DEFAULT_COMPRESS_FROM: u64 = 32 << 20;
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
const S_LOG_LEN: usize = 32;
const S_DECODED_LEN: usize = 40;
const S_CODEC: usize = 48;

/// How a slot stores its base.
const CODEC_STORED: u32 = 0;
const CODEC_LZ4_BLOCK: u32 = 1;
/// An LZ4 block decodes to at most this many times its length (a match of 255 + 4 bytes needs
/// a byte of length): a larger decoded length is refused before anything is allocated.
const LZ4_MAX_RATIO: u64 = 255;

// Log record header, read from a private copy (not shared memory), little endian.
const RECORD_HEADER_SIZE: usize = 16;
/// The log may grow to this many bytes, or half the base, whichever is more, before the
/// publisher asks for a compaction (readers that start late replay the whole log).
const LOG_COMPACT_MIN: u64 = 1 << 20;

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
    #[error("snapshot region {path}: generation {generation}'s base does not decode: {problem}")]
    Decode {
        path: PathBuf,
        generation: u64,
        problem: String,
    },
    #[error("snapshot region {path}: publisher kept rewriting the slot; will retry")]
    Busy { path: PathBuf },
    #[error("snapshot region {path}: log record after generation {after} is malformed: {problem}")]
    Record {
        path: PathBuf,
        after: u64,
        problem: String,
    },
}

impl RegionError {
    /// Whether the error is bytes no publisher should have written (a refused generation),
    /// as opposed to a region that cannot be read for now.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            RegionError::Checksum { .. }
                | RegionError::Record { .. }
                | RegionError::Length { .. }
                | RegionError::Decode { .. }
        )
    }
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
    /// The layout of a mapped region's bytes.
    fn of(map: &[u8]) -> Layout {
        Layout {
            base: map.as_ptr(),
            len: map.len(),
        }
    }

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
    /// A complete snapshot of at least this many bytes is stored LZ4-compressed; a smaller one
    /// as is.
    pub compress_from: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            slot_capacity: DEFAULT_SLOT_CAPACITY,
            owner: None,
            compress_from: DEFAULT_COMPRESS_FROM,
        }
    }
}

/// The writing side, owned by ctrl-agent.
pub struct Publisher {
    path: PathBuf,
    file: File,
    map: MmapMut,
    options: PublishOptions,
    epoch: u64,
    generation: u64,
    /// Slot holding the current base and log; `None` until the first complete snapshot.
    active: Option<u32>,
    base_len: u64,
    log_len: u64,
}

/// What [`Publisher::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The change is published as this generation.
    Published(Version),
    /// Nothing was published: there is no base yet, or the change does not fit in the slot.
    /// Publish the complete snapshot instead.
    NeedsFull,
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
        let (file, map, epoch) = Self::create_file(&path, &options)?;
        Ok(Publisher {
            path,
            file,
            map,
            options,
            epoch,
            generation: 0,
            active: None,
            base_len: 0,
            log_len: 0,
        })
    }

    fn create_file(
        path: &Path,
        options: &PublishOptions,
    ) -> Result<(File, MmapMut, u64), RegionError> {
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

        // Remember the file we replace so its readers can be told to move on (writable: the
        // flag and the wake word are written through a shared mapping).
        let previous = OpenOptions::new().read(true).write(true).open(path).ok();
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Some(old) = previous {
            mark_superseded(&old);
        }
        Ok((file, map, epoch))
    }

    fn layout(&self) -> Layout {
        Layout::of(&self.map)
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

    /// Bytes of delta records since the last complete snapshot.
    pub fn log_bytes(&self) -> u64 {
        self.log_len
    }

    /// Bytes the last complete snapshot takes in its slot (compressed).
    pub fn base_bytes(&self) -> u64 {
        self.base_len
    }

    /// Bytes each of the two slots holds, base and log together: a complete snapshot that
    /// does not fit cannot be published.
    pub fn slot_capacity(&self) -> u64 {
        self.options.slot_capacity
    }

    /// Memory the region's file takes on its filesystem (the pages written so far: it is
    /// sparse, and on tmpfs this is what counts against the volume's size limit).
    pub fn file_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Whether the log has grown enough that the next quiet moment should [`compact`] it:
    /// every reader that starts late replays the whole log, and a compaction holds the log
    /// and two bases at once, so the log is bounded by the stored (compressed) base.
    ///
    /// [`compact`]: Publisher::compact
    pub fn wants_compaction(&self) -> bool {
        self.log_len > LOG_COMPACT_MIN.max(self.base_len / 2)
    }

    /// Publishes a complete snapshot as the next generation.
    pub fn publish(&mut self, payload: &[u8]) -> Result<Version, RegionError> {
        self.write_base(payload, self.generation + 1)?;
        Ok(self.version())
    }

    /// Replaces the base and its log with `payload`, a complete snapshot of the *current*
    /// generation (base plus every delta since). Readers that kept up notice nothing; one that
    /// starts later reads one payload instead of a long log.
    pub fn compact(&mut self, payload: &[u8]) -> Result<Version, RegionError> {
        self.write_base(payload, self.generation.max(1))?;
        Ok(self.version())
    }

    /// Publishes a change (an encoded delta) as the next generation, appended to the log.
    pub fn append(&mut self, delta: &[u8]) -> Result<Appended, RegionError> {
        let Some(slot) = self.active else {
            return Ok(Appended::NeedsFull);
        };
        let capacity = self.options.slot_capacity;
        let record_len = RECORD_HEADER_SIZE as u64 + (delta.len() as u64).next_multiple_of(8);
        let log_start = self.base_len.next_multiple_of(8);
        if delta.len() > u32::MAX as usize || log_start + self.log_len + record_len > capacity {
            return Ok(Appended::NeedsFull);
        }
        let generation = self.generation + 1;
        let offset = Layout::slot_offset(slot, capacity);
        let at = offset + SLOT_HEADER_SIZE + (log_start + self.log_len) as usize;
        let record = &mut self.map[at..at + record_len as usize];
        record[0..4].copy_from_slice(&(delta.len() as u32).to_le_bytes());
        record[4..8].copy_from_slice(&crc32c::crc32c(delta).to_le_bytes());
        record[8..16].copy_from_slice(&generation.to_le_bytes());
        record[RECORD_HEADER_SIZE..RECORD_HEADER_SIZE + delta.len()].copy_from_slice(delta);
        record[RECORD_HEADER_SIZE + delta.len()..].fill(0);
        self.log_len += record_len;
        let layout = self.layout();
        // Length before generation: a reader that sees the generation sees the record.
        layout
            .u64_at(offset + S_LOG_LEN)
            .store(self.log_len, Ordering::Release);
        self.announce(generation);
        Ok(Appended::Published(self.version()))
    }

    fn announce(&mut self, generation: u64) {
        let layout = self.layout();
        layout
            .u64_at(H_GENERATION)
            .store(generation, Ordering::Release);
        wake_readers(&layout);
        self.generation = generation;
    }

    fn write_base(&mut self, payload: &[u8], generation: u64) -> Result<(), RegionError> {
        let compress = payload.len() as u64 >= self.options.compress_from;
        // Compressed straight into the slot where LZ4's worst case fits there; otherwise
        // through a buffer first, to learn whether the result fits the slots at all.
        let room = lz4_flex::block::get_maximum_output_size(payload.len()) as u64;
        let staged = (compress && room > self.options.slot_capacity).then(|| stage_base(payload));
        let need = match &staged {
            Some((_, stored)) => stored.len() as u64,
            None if compress => 0,
            None => payload.len() as u64,
        };
        if need > self.options.slot_capacity {
            // Outgrown: move to a bigger file. Readers see a new inode and epoch.
            let mut capacity = self.options.slot_capacity.max(1 << 20);
            while capacity < need {
                capacity *= 2;
            }
            // Kept only once the file exists: a publisher that failed to grow goes on with the
            // file and capacity it has, not with offsets for a file it does not have.
            let grown = PublishOptions {
                slot_capacity: capacity,
                ..self.options.clone()
            };
            let (file, map, epoch) = Self::create_file(&self.path, &grown)?;
            self.options = grown;
            self.file = file;
            self.map = map;
            self.epoch = epoch;
            self.active = None;
        }
        let capacity = self.options.slot_capacity;
        let previous = self.active;
        let slot = previous.map_or(0, |s| 1 - s);
        let offset = Layout::slot_offset(slot, capacity);
        let layout = self.layout();
        let seq = layout.u64_at(offset + S_SEQ);
        let start = seq.load(Ordering::Relaxed) | 1;
        seq.store(start, Ordering::Relaxed);
        fence(Ordering::Release);
        let data_at = offset + SLOT_HEADER_SIZE;
        let slot_data = &mut self.map[data_at..data_at + capacity as usize];
        let compressed = match &staged {
            Some((codec, stored)) => {
                slot_data[..stored.len()].copy_from_slice(stored);
                Some((*codec, stored.len()))
            }
            None if compress => lz4_flex::block::compress_into(payload, slot_data)
                .ok()
                .filter(|len| *len < payload.len())
                .map(|len| (CODEC_LZ4_BLOCK, len)),
            None => None,
        };
        let (codec, len) = compressed.unwrap_or_else(|| {
            slot_data[..payload.len()].copy_from_slice(payload);
            (CODEC_STORED, payload.len())
        });
        let crc = base_checksum(&slot_data[..len], payload.len() as u64, codec);
        let layout = self.layout();
        layout
            .u64_at(offset + S_GENERATION)
            .store(generation, Ordering::Relaxed);
        layout
            .u64_at(offset + S_LEN)
            .store(len as u64, Ordering::Relaxed);
        layout
            .u64_at(offset + S_DECODED_LEN)
            .store(payload.len() as u64, Ordering::Relaxed);
        layout
            .u32_at(offset + S_CODEC)
            .store(codec, Ordering::Relaxed);
        layout.u32_at(offset + S_CRC).store(crc, Ordering::Relaxed);
        layout
            .u64_at(offset + S_LOG_LEN)
            .store(0, Ordering::Relaxed);
        layout
            .u64_at(offset + S_SEQ)
            .store(start + 1, Ordering::Release);
        layout.u32_at(H_ACTIVE).store(slot, Ordering::Release);
        self.active = Some(slot);
        self.base_len = len as u64;
        self.log_len = 0;
        self.announce(generation);
        if let Some(old) = previous {
            self.release_slot(old);
        }
        Ok(())
    }

    /// Invalidates a slot no longer active and gives its pages back: a reader still reading
    /// it sees `seq` change and retries on the active one.
    fn release_slot(&mut self, slot: u32) {
        let capacity = self.options.slot_capacity;
        let offset = Layout::slot_offset(slot, capacity);
        let layout = self.layout();
        let seq = layout.u64_at(offset + S_SEQ);
        seq.store(seq.load(Ordering::Relaxed) | 1, Ordering::Release);
        let data_at = (offset + SLOT_HEADER_SIZE) as u64;
        // Only whole pages can be punched; the slot's first partial page stays.
        let from = data_at.next_multiple_of(4096);
        let to = data_at + capacity;
        if to > from {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on our own descriptor; KEEP_SIZE means the file length
            // (what readers bound their reads by) does not change, and punched pages read as
            // zeros, which the seq check above already tells readers to discard.
            #[allow(unsafe_code)]
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    from as libc::off_t,
                    (to - from) as libc::off_t,
                )
            };
            if rc != 0 {
                // Not fatal: the region just keeps two slots' worth of pages.
                tracing::debug!(error = %io::Error::last_os_error(), "cannot release slot pages");
            }
        }
    }

    /// Test hook: flips a byte of the active base without fixing its checksum, as a stray
    /// write or bad memory would, and publishes it as a new complete generation.
    #[doc(hidden)]
    pub fn corrupt_active_slot_for_test(&mut self) {
        let Some(active) = self.active else { return };
        let capacity = self.options.slot_capacity;
        let offset = Layout::slot_offset(active, capacity);
        self.map[offset + SLOT_HEADER_SIZE] ^= 0xff;
        let layout = self.layout();
        let next = self.generation + 1;
        // A new base generation and seq, so readers read the base again.
        let seq = layout.u64_at(offset + S_SEQ);
        seq.store(seq.load(Ordering::Relaxed) + 2, Ordering::Release);
        layout
            .u64_at(offset + S_GENERATION)
            .store(next, Ordering::Release);
        layout
            .u64_at(offset + S_LOG_LEN)
            .store(0, Ordering::Release);
        self.log_len = 0;
        self.announce(next);
    }

    /// Fuzzing hook: makes both slots' base checksums match whatever their headers and bytes
    /// say (where the lengths fit the file), so that arbitrary bases reach the decoder.
    #[doc(hidden)]
    pub fn seal_slots_for_fuzzing(file: &mut [u8]) {
        let Some(capacity) = file
            .get(H_SLOT_CAPACITY..H_SLOT_CAPACITY + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
            .filter(|c| *c <= MAX_SLOT_CAPACITY && c.is_multiple_of(8))
        else {
            return;
        };
        for slot in 0..2 {
            let at = Layout::slot_offset(slot, capacity);
            let field = |file: &[u8], offset: usize, len: usize| {
                let mut bytes = [0u8; 8];
                bytes[..len].copy_from_slice(file.get(at + offset..at + offset + len)?);
                Some(u64::from_ne_bytes(bytes))
            };
            let (Some(len), Some(decoded_len), Some(codec)) = (
                field(file, S_LEN, 8),
                field(file, S_DECODED_LEN, 8),
                field(file, S_CODEC, 4),
            ) else {
                continue;
            };
            let data = at + SLOT_HEADER_SIZE;
            let Some(stored) = usize::try_from(len)
                .ok()
                .and_then(|len| file.get(data..data.checked_add(len)?))
            else {
                continue;
            };
            let crc = base_checksum(stored, decoded_len, codec as u32);
            file[at + S_CRC..at + S_CRC + 4].copy_from_slice(&crc.to_ne_bytes());
        }
    }

    /// Test hook: flips a byte of the newest log record's payload, as a stray write would.
    #[doc(hidden)]
    pub fn corrupt_last_record_for_test(&mut self) {
        let Some(active) = self.active else { return };
        if self.log_len == 0 {
            return;
        }
        let capacity = self.options.slot_capacity;
        let data_at = Layout::slot_offset(active, capacity) + SLOT_HEADER_SIZE;
        // Walk to the last record.
        let mut at = self.base_len.next_multiple_of(8) as usize;
        let end = at + self.log_len as usize;
        let mut last = at;
        while at < end {
            last = at;
            let len = u32::from_le_bytes(
                self.map[data_at + at..data_at + at + 4]
                    .try_into()
                    .unwrap_or_default(),
            ) as usize;
            at += RECORD_HEADER_SIZE + len.next_multiple_of(8);
        }
        self.map[data_at + last + RECORD_HEADER_SIZE] ^= 0xff;
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
    let layout = Layout::of(&map);
    layout
        .u32_at(H_FLAGS)
        .fetch_or(FLAG_SUPERSEDED, Ordering::Release);
    wake_readers(&layout);
}

/// Bumps the wake word and wakes every reader waiting on it, in any process.
fn wake_readers(layout: &Layout) {
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
    /// Shared with the bases stored as is that reads handed out.
    map: Arc<Mmap>,
    dev: u64,
    ino: u64,
    epoch: u64,
    capacity: u64,
}

impl Mapped {
    fn layout(&self) -> Layout {
        Layout::of(&self.map)
    }
}

/// One publication as a reader found it: a complete snapshot or a delta, checksum-verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    pub generation: u64,
    pub payload: Payload,
}

/// A seqlock reader's closing check: whether a slot's `seq` still has the even value `before`
/// it had when the reads of its bytes began. The fence orders those reads before this load.
fn unchanged_since(seq: &AtomicU64, before: u64) -> bool {
    fence(Ordering::Acquire);
    seq.load(Ordering::Relaxed) == before
}

/// A publication's bytes: a copy (log records, a decompressed base), or a base stored as is,
/// read where it lies in the shared mapping. The publisher may replace that base while it is
/// being read; whoever reads it checks [`Payload::intact`] after reading, and discards what
/// it read from a payload that is no longer intact.
pub struct Payload(Bytes);

enum Bytes {
    Copied(Vec<u8>),
    Mapped {
        map: Arc<Mmap>,
        at: usize,
        len: usize,
        /// The slot's `seq` offset and the even value it had when the checksum matched.
        seq_at: usize,
        seq: u64,
    },
}

impl Payload {
    /// Whether the bytes are still those whose checksum the read matched: always for a copy;
    /// for a base read in place, while its slot has not been rewritten or released since.
    pub fn intact(&self) -> bool {
        match &self.0 {
            Bytes::Copied(_) => true,
            Bytes::Mapped {
                map, seq_at, seq, ..
            } => unchanged_since(Layout::of(map).u64_at(*seq_at), *seq),
        }
    }

    /// Whether the bytes are read in place from the shared mapping.
    pub fn in_place(&self) -> bool {
        matches!(self.0, Bytes::Mapped { .. })
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload(Bytes::Copied(bytes))
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Bytes::Copied(bytes) => bytes,
            Bytes::Mapped { map, at, len, .. } => &map[*at..*at + *len],
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if self.in_place() {
            "in place"
        } else {
            "copied"
        };
        write!(f, "Payload({} bytes, {place})", self.len())
    }
}

/// What a read found.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Nothing newer than what this subscriber returned last.
    Unchanged,
    /// Everything published since the last read, to apply in order: the state at `version` is
    /// `base` (when present, replacing whatever the caller held) followed by each delta.
    New {
        version: Version,
        base: Option<Published>,
        deltas: Vec<Published>,
    },
}

/// Where this subscriber stopped in a slot's log: valid while that slot's `seq` is unchanged.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    slot: u32,
    seq: u64,
    /// Log bytes already returned.
    offset: u64,
}

/// The reading side, in the data plane. Takes no lock, ever; a reader that loses a race with
/// the publisher retries the copy.
pub struct Subscriber {
    path: PathBuf,
    mapped: Option<Mapped>,
    position: Position,
    /// Set when the last read could not make progress and nothing it looked at will change
    /// by itself (a replacement file that cannot be mapped, a slot left mid-write, a header
    /// ahead of its log): the wake word's value before that read, so that `wait` sleeps until
    /// the next publication or its timeout instead of letting the caller spin.
    stalled_at_wake: Option<u32>,
}

/// Where a subscriber stands in the region: kept apart from the mapping so that a read can
/// update it while it borrows the mapped bytes.
#[derive(Default)]
struct Position {
    last: Option<Version>,
    cursor: Option<Cursor>,
    /// The caller could not apply what it was given: the next read starts from a base.
    resync: bool,
    /// The slot and `seq` a refusal happened on: a compaction replaces that base without a new
    /// generation, and a reader waiting to resync must notice it.
    refused_base: Option<(u32, u64)>,
}

impl Position {
    /// What was read is not applied (refused by the caller, or found corrupt): the next read
    /// starts from a base, or sooner from `base` (slot, `seq`) replaced.
    fn refuse(&mut self, base: Option<(u32, u64)>) {
        self.resync = true;
        self.refused_base = base;
        self.cursor = None;
    }

    /// Whether a resync is pending and the base it was refused on has been replaced since
    /// (a compaction keeps the generation but may have healed what was refused).
    fn base_replaced_since_refusal(&self, layout: &Layout, capacity: u64) -> bool {
        let Some((slot, seq)) = self.refused_base.filter(|_| self.resync) else {
            return false;
        };
        let active = layout.u32_at(H_ACTIVE).load(Ordering::Acquire) & 1;
        let now = layout
            .u64_at(Layout::slot_offset(active, capacity) + S_SEQ)
            .load(Ordering::Acquire);
        active != slot || now != seq
    }

    /// Whether `current` is what the last read returned, with no refused base replaced since.
    fn has_seen(&self, current: Version, layout: &Layout, capacity: u64) -> bool {
        self.last == Some(current) && !self.base_replaced_since_refusal(layout, capacity)
    }
}

impl Subscriber {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Subscriber {
            path: path.as_ref().to_owned(),
            mapped: None,
            position: Position::default(),
            stalled_at_wake: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The caller refused what the last read returned (a delta that does not apply, say):
    /// from the next publication on, reads start again from the complete snapshot.
    pub fn resync(&mut self) {
        let base = self.position.cursor.map(|c| (c.slot, c.seq));
        self.position.refuse(base);
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
        self.position.cursor = None;
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
        let map = Arc::new(unsafe { MmapOptions::new().map(&file) }.map_err(io_err(&path))?);
        if map[H_MAGIC..H_MAGIC + 8] != MAGIC {
            return Err(RegionError::Magic(path));
        }
        let layout = Layout::of(&map);
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

    /// Returns everything published since the last read. A corrupt generation is reported once
    /// and then treated as seen, so the caller keeps its last good view without being told
    /// about the same bad bytes again.
    pub fn read(&mut self) -> Result<ReadOutcome, RegionError> {
        let wake_before = self
            .mapped
            .as_ref()
            .map_or(0, |m| m.layout().u32_at(H_WAKE).load(Ordering::Acquire));
        let outcome = self.read_published();
        let stalled = match &outcome {
            Ok((_, header_ahead)) => *header_ahead,
            // The next publication or compaction changes these, and `wait` sees it.
            Err(error) if error.is_corrupt() => false,
            Err(RegionError::Empty { .. }) => false,
            Err(_) => true,
        };
        self.stalled_at_wake = stalled.then_some(wake_before);
        outcome.map(|(outcome, _)| outcome)
    }

    /// [`Subscriber::read`], and whether the header announced a generation the log does not
    /// hold (a publisher's bug: reading again cannot help).
    fn read_published(&mut self) -> Result<(ReadOutcome, bool), RegionError> {
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
            let current = Version {
                epoch: m.epoch,
                generation,
            };
            if self.position.has_seen(current, &layout, m.capacity) {
                return Ok((ReadOutcome::Unchanged, false));
            }
            let slot = layout.u32_at(H_ACTIVE).load(Ordering::Acquire) & 1;
            let offset = Layout::slot_offset(slot, m.capacity);
            let seq = layout.u64_at(offset + S_SEQ);
            let before = seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let base_generation = layout.u64_at(offset + S_GENERATION).load(Ordering::Relaxed);
            let base_len = layout.u64_at(offset + S_LEN).load(Ordering::Relaxed);
            let decoded_len = layout
                .u64_at(offset + S_DECODED_LEN)
                .load(Ordering::Relaxed);
            let codec = layout.u32_at(offset + S_CODEC).load(Ordering::Relaxed);
            let expected = layout.u32_at(offset + S_CRC).load(Ordering::Relaxed);
            let log_len = layout.u64_at(offset + S_LOG_LEN).load(Ordering::Acquire);
            // Bounded by the capacity (itself bounded) before any arithmetic, so no length a
            // corrupt header claims can overflow (found by the region_file fuzz target).
            let log_start = base_len.min(m.capacity).next_multiple_of(8);
            // Where this reader's state stands in this slot's history.
            let held = match self.position.last {
                Some(last) if last.epoch == m.epoch && !self.position.resync => {
                    Some(last.generation)
                }
                _ => None,
            };
            let need_base = held.is_none_or(|g| g < base_generation);
            let from = match self.position.cursor {
                Some(c) if !need_base && c.slot == slot && c.seq == before => c.offset,
                _ => 0,
            };
            if base_len > m.capacity
                || log_len > m.capacity
                || log_start + log_len > m.capacity
                || from > log_len
            {
                if !unchanged_since(seq, before) {
                    continue;
                }
                // Seen, and not reported again.
                self.position.last = Some(current);
                self.position.refuse(Some((slot, before)));
                return Err(RegionError::Length {
                    path: self.path.clone(),
                    generation,
                    len: log_start.saturating_add(log_len),
                    capacity: m.capacity,
                });
            }
            let data_at = offset + SLOT_HEADER_SIZE;
            // The base is checked and decoded where it lies, not copied out first: a copy
            // costs a pass over it and as much memory again while it is decoded. Torn bytes
            // are harmless here (the decoder is bounded and safe); only a decode the sequence
            // check below confirms is used. A base stored as is is not copied at all.
            let base = need_base.then(|| {
                let stored = &m.map[data_at..data_at + base_len as usize];
                let found = base_checksum(stored, decoded_len, codec);
                // An unchecked header must not size an allocation.
                let decoded = (found == expected).then(|| decode_base(stored, decoded_len, codec));
                (found, decoded)
            });
            let log_at = data_at + (log_start + from) as usize;
            let log = m.map[log_at..log_at + (log_len - from) as usize].to_vec();
            if !unchanged_since(seq, before) {
                // The publisher replaced the slot while we read; start over on the new one.
                continue;
            }
            // From here on the bytes are ours; anything wrong is corruption, reported once, and
            // what follows it cannot be applied: the next generation is read from a base.
            self.position.last = Some(current);
            self.position.refuse(Some((slot, before)));
            let mut applied = held.unwrap_or(0);
            let base = match base {
                Some((found, decoded)) => {
                    let Some(decoded) = decoded else {
                        return Err(RegionError::Checksum {
                            path: self.path.clone(),
                            generation: base_generation,
                            found,
                            expected,
                        });
                    };
                    let decoded = decoded.map_err(|problem| RegionError::Decode {
                        path: self.path.clone(),
                        generation: base_generation,
                        problem,
                    })?;
                    let payload = match decoded {
                        Some(copy) => Payload::from(copy),
                        None => Payload(Bytes::Mapped {
                            map: m.map.clone(),
                            at: data_at,
                            len: base_len as usize,
                            seq_at: offset + S_SEQ,
                            seq: before,
                        }),
                    };
                    applied = base_generation;
                    Some(Published {
                        generation: base_generation,
                        payload,
                    })
                }
                None => None,
            };
            let deltas = parse_records(&log, &mut applied).map_err(|problem| match problem {
                RecordProblem::Checksum {
                    generation,
                    found,
                    expected,
                } => RegionError::Checksum {
                    path: self.path.clone(),
                    generation,
                    found,
                    expected,
                },
                RecordProblem::Malformed(problem) => RegionError::Record {
                    path: self.path.clone(),
                    after: applied,
                    problem,
                },
            })?;
            let version = Version {
                epoch: m.epoch,
                generation: applied,
            };
            self.position = Position {
                last: Some(version),
                cursor: Some(Cursor {
                    slot,
                    seq: before,
                    offset: log_len,
                }),
                resync: false,
                refused_base: None,
            };
            let header_ahead = applied < generation;
            if base.is_none() && deltas.is_empty() {
                return Ok((ReadOutcome::Unchanged, header_ahead));
            }
            return Ok((
                ReadOutcome::New {
                    version,
                    base,
                    deltas,
                },
                header_ahead,
            ));
        }
        Err(RegionError::Busy {
            path: self.path.clone(),
        })
    }

    /// Blocks the calling thread until the publisher signals a change or `timeout` passes.
    /// Call it between reads; it returns at once if something was published since `read`.
    pub fn wait(&self, timeout: Duration) {
        match (&self.mapped, self.stalled_at_wake) {
            (Some(m), Some(seen)) => futex_wait(m.layout().u32_at(H_WAKE), seen, timeout),
            (Some(m), None) => {
                let layout = m.layout();
                let wake = layout.u32_at(H_WAKE);
                let seen = wake.load(Ordering::Acquire);
                let published = layout.u64_at(H_GENERATION).load(Ordering::Acquire);
                let superseded = layout.u32_at(H_FLAGS).load(Ordering::Acquire) & FLAG_SUPERSEDED;
                let current = Version {
                    epoch: m.epoch,
                    generation: published,
                };
                // Nothing published yet (the agent created the region and is still listing
                // its sources) is nothing new either: sleep, do not spin on `read`.
                let nothing_new =
                    published == 0 || self.position.has_seen(current, &layout, m.capacity);
                if superseded == 0 && nothing_new {
                    futex_wait(wake, seen, timeout);
                }
            }
            (None, _) => std::thread::sleep(timeout.min(Duration::from_millis(100))),
        }
    }
}

/// A base as it will be stored: an LZ4 block, or the payload as is where that is no smaller.
fn stage_base(payload: &[u8]) -> (u32, std::borrow::Cow<'_, [u8]>) {
    let compressed = lz4_flex::block::compress(payload);
    if compressed.len() < payload.len() {
        (CODEC_LZ4_BLOCK, compressed.into())
    } else {
        (CODEC_STORED, payload.into())
    }
}

/// The base's checksum: its stored bytes, then how they decode, so that a header torn or
/// corrupted there is refused before it sizes an allocation.
fn base_checksum(stored: &[u8], decoded_len: u64, codec: u32) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(stored), &decoded_len.to_le_bytes());
    crc32c::crc32c_append(crc, &codec.to_le_bytes())
}

/// The snapshot a checksummed base stores: decoded, or `None` where the stored bytes are it.
fn decode_base(stored: &[u8], decoded_len: u64, codec: u32) -> Result<Option<Vec<u8>>, String> {
    match codec {
        CODEC_STORED if decoded_len == stored.len() as u64 => Ok(None),
        CODEC_STORED => Err(format!(
            "{} bytes stored as is claim to be {decoded_len}",
            stored.len()
        )),
        CODEC_LZ4_BLOCK => {
            let most = (stored.len() as u64).saturating_mul(LZ4_MAX_RATIO);
            let len = usize::try_from(decoded_len)
                .ok()
                .filter(|_| decoded_len <= most)
                .ok_or_else(|| {
                    format!("{} LZ4 bytes cannot decode to {decoded_len}", stored.len())
                })?;
            let mut decoded = vec![0u8; len];
            let written = lz4_flex::block::decompress_into(stored, &mut decoded)
                .map_err(|e| format!("LZ4: {e}"))?;
            if written != len {
                return Err(format!(
                    "LZ4 block decodes to {written} bytes, header says {decoded_len}"
                ));
            }
            Ok(Some(decoded))
        }
        other => Err(format!("unknown codec {other}")),
    }
}

enum RecordProblem {
    Checksum {
        generation: u64,
        found: u32,
        expected: u32,
    },
    Malformed(String),
}

/// Splits a copied log into its records, keeping those after generation `applied` (a reader
/// that moved to a compacted slot has seen the first ones) and advancing `applied`. Records
/// must follow each other one generation at a time: a gap means the log cannot be trusted.
fn parse_records(log: &[u8], applied: &mut u64) -> Result<Vec<Published>, RecordProblem> {
    let mut records = Vec::new();
    let mut previous: Option<u64> = None;
    let mut rest = log;
    while !rest.is_empty() {
        let header = rest
            .get(..RECORD_HEADER_SIZE)
            .ok_or_else(|| RecordProblem::Malformed(format!("{} stray bytes", rest.len())))?;
        let field = |range: std::ops::Range<usize>| {
            let mut bytes = [0u8; 8];
            bytes[..range.len()].copy_from_slice(&header[range]);
            u64::from_le_bytes(bytes)
        };
        let len = field(0..4) as usize;
        let expected = field(4..8) as u32;
        let generation = field(8..16);
        let payload = rest
            .get(RECORD_HEADER_SIZE..RECORD_HEADER_SIZE + len)
            .ok_or_else(|| {
                RecordProblem::Malformed(format!(
                    "generation {generation} claims {len} bytes, {} left",
                    rest.len() - RECORD_HEADER_SIZE
                ))
            })?;
        let found = crc32c::crc32c(payload);
        if found != expected {
            return Err(RecordProblem::Checksum {
                generation,
                found,
                expected,
            });
        }
        // A log holds one generation after another, from the one after its base (never 0):
        // anything else, zero-filled bytes included (whose checksum matches an empty
        // payload), is not a log a publisher wrote.
        if generation == 0 || previous.is_some_and(|p| generation != p + 1) {
            return Err(RecordProblem::Malformed(format!(
                "generation {generation} after {}",
                previous.map_or("the base".to_owned(), |p| p.to_string())
            )));
        }
        previous = Some(generation);
        if generation > *applied {
            if generation != *applied + 1 {
                return Err(RecordProblem::Malformed(format!(
                    "generation {generation} follows {applied}"
                )));
            }
            *applied = generation;
            records.push(Published {
                generation,
                payload: payload.to_vec().into(),
            });
        }
        let step = (RECORD_HEADER_SIZE + len.next_multiple_of(8)).min(rest.len());
        rest = &rest[step..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests;
