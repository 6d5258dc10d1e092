//! Every path kanari pins under the bpffs, in one place.
//!
//! Pinning (so the data path survives an agent restart) is not done yet: the
//! agent detaches everything when it stops. The directory is reserved now so
//! operators and later versions agree on it.

/// The directory kanari's pinned programs, links and maps live in.
pub const PIN_ROOT: &str = "/sys/fs/bpf/kanari";
