//! The one contract both processes share.
//!
//! - [`schema`]: what a snapshot says (workloads, services, policies, identities), as protobuf.
//! - [`delta`]: a change between two snapshots, keyed per entry.
//! - [`region`]: how it travels: a versioned, checksummed double buffer in a shared-memory file,
//!   each slot a complete snapshot followed by a log of deltas, published without ever
//!   blocking readers and read without ever taking a lock.
//!
//! This crate and the I/O layer are the only places allowed `unsafe`; here it is confined to
//! the mapping of the region and the futex calls, each with a `SAFETY:` note.

pub mod delta;
pub mod enrollment;
pub mod region;
pub mod schema;
#[doc(hidden)]
pub mod test_support;
pub mod view;

pub use delta::Delta;
pub use region::{Appended, Payload, Published, Publisher, ReadOutcome, RegionError, Subscriber};
pub use schema::{decode, encode, Snapshot, SCHEMA_VERSION};
