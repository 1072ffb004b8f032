//! arch (placeholder)
