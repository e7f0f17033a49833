fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=weft/v1/agent.proto");
    tonic_prost_build::configure().compile_protos(&["weft/v1/agent.proto"], &["."])?;
    Ok(())
}
