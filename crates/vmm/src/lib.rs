//! vmm (placeholder)
