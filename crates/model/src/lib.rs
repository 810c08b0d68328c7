//! The language model: configuration, the Llama decoder on tch, Hugging Face checkpoints,
//! text generation, device selection, LoRA adapters (PEFT folders) and NF4 quantisation.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod rng;
pub mod safetensors;
pub mod tokenizer;

pub use config::ModelConfig;
pub use llama::Llama;
