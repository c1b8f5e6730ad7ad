//! The one contract both processes share.
//!
//! - [`schema`]: what a snapshot says (workloads, services, policies, identities), as protobuf.
//! - [`region`]: how it travels: a versioned, checksummed double buffer in a shared-memory file,
//!   published without ever blocking readers and read without ever taking a lock.
//!
//! This crate and the I/O layer are the only places allowed `unsafe`; here it is confined to
//! the mapping of the region and the futex calls, each with a `SAFETY:` note.

pub mod enrollment;
pub mod region;
pub mod schema;
#[doc(hidden)]
pub mod test_support;

pub use region::{Publisher, ReadOutcome, RegionError, Subscriber};
pub use schema::{decode, encode, Snapshot, SCHEMA_VERSION};
