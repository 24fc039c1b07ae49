//! Compiles `proto/view.proto` into the zero-copy view types used on the hot path.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/view.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    prost_build::Config::new()
        .protoc_executable(protoc)
        .bytes(["."])
        .compile_protos(&["proto/view.proto"], &["proto"])?;
    Ok(())
}
