//! Trainers over `ferrite-model`: next-token pretraining with a hand-written AdamW whose
//! state checkpoints exactly, a warmup-then-cosine schedule, resumable runs, and supervised
//! fine-tuning (full, LoRA, QLoRA).

pub mod adamw;
pub mod data;
pub mod job;
pub mod pretrain;
pub mod schedule;
pub mod sft;
pub mod sft_data;
mod sft_job;
pub mod state_file;
