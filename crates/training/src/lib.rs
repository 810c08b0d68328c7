//! Trainers over `ferrite-model`: next-token pretraining with a hand-written AdamW whose
//! state checkpoints exactly, a warmup-then-cosine schedule, and resumable runs.

pub mod adamw;
pub mod data;
pub mod job;
pub mod pretrain;
pub mod schedule;
