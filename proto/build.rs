//! Compiles `proto/kiln.proto` (with the Open Inference Protocol's `inference.proto` and the slice of etcd's API the benchmark drives) with protox (pure Rust), so building Kiln needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["proto/kiln.proto", "proto/etcd.proto", "proto/inference.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor contents stay reference-counted buffers instead of being copied into `Vec<u8>`.
        .bytes(".inference")
        .compile_fds(descriptors)?;
    Ok(())
}
