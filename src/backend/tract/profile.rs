//! Timing block shapes in tract (placeholder until the profiler lands).
