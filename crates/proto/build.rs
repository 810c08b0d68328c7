//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: `env!` would bake in the folder of whichever checkout compiled this
    // script, and a target folder shared between checkouts reuses the compiled script.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest).join("../../proto");
    let file = root.join("ferrite/events/v1/events.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile([&file], [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
