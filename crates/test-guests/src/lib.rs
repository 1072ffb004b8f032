//! test-guests (placeholder)
